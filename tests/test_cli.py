import json
import os

import pytest

from fedjax_lab import cli
from fedjax_lab.algorithms import ALGORITHMS


def test_list_names_algorithms_and_datasets(capsys):
    cli.main(["list"])
    out = capsys.readouterr().out
    for name in ("fedavg", "fedprox", "fedadam", "synthetic", "logistic"):
        assert name in out


def test_run_writes_config_and_metrics(tmp_path, capsys):
    out = str(tmp_path / "run")
    cli.main(["run", "fedprox", "--dataset", "synthetic:alpha=1,beta=1,clients=8",
              "--rounds", "4", "--eval-every", "2", "--seed", "0",
              "--out", out, "--mu", "1", "--stragglers", "0.5", "--clients-per-round", "4",
              "--local-steps", "3", "--batch-size", "5", "--client-lr", "0.02", "--no-progress"])
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["mu"] == 1.0 and config["stragglers"] == 0.5 and config["client_lr"] == 0.02
    assert config["dataset"] == "synthetic:alpha=1,beta=1,clients=8"
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["round"] for r in rows] == [2, 4]
    for key in ("train_loss", "test_loss", "test_accuracy", "test_accuracy_p10",
                "test_accuracy_p50", "test_accuracy_p90"):
        assert key in rows[-1]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["round"] == 4


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_factory_keyword_and_setup_field_is_a_flag(name):
    factory = ALGORITHMS[name][0]
    parser = cli.run_parser(name, factory)
    flags = set(cli._valid_flags(parser))
    for pname, _, _ in cli.own_params(factory) + cli.setup_params(factory):
        assert "--" + pname.replace("_", "-") in flags


def test_flag_types_come_from_the_signature():
    parser = cli.run_parser("fedprox", ALGORITHMS["fedprox"][0])
    args = parser.parse_args(["--mu", "0.5", "--epochs", "3", "--no-drop-stragglers"])
    assert args.mu == 0.5 and args.epochs == 3 and args.drop_stragglers is False


def test_unknown_flag_lists_valid_flags():
    with pytest.raises(SystemExit, match=r"unknown flag\(s\) --bogus .*valid flags: .*--mu"):
        cli.main(["run", "fedprox", "--bogus", "1"])


def test_unknown_algorithm_and_dataset_list_valid_ones(tmp_path):
    with pytest.raises(SystemExit, match="valid algorithms: .*fedavg"):
        cli.main(["run", "fedfoo"])
    with pytest.raises(SystemExit, match="valid datasets"):
        cli.main(["run", "fedavg", "--dataset", "nope", "--no-progress"])
    with pytest.raises(SystemExit, match="valid commands"):
        cli.main(["frobnicate"])


def test_bad_value_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="clients_per_round=100 exceeds"):
        cli.main(["run", "fedavg", "--clients-per-round", "100", "--rounds", "1", "--no-progress"])
    with pytest.raises(SystemExit, match="mu must be >= 0"):
        cli.main(["run", "fedprox", "--mu", "-1", "--no-progress"])


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint"):
        cli.main(["run", "fedavg", "--rounds", "2", "--eval-every", "1", "--out", str(tmp_path),
                  "--resume", "--no-progress"])


def test_a_hyperparameter_may_be_called_alpha_or_beta(monkeypatch, tmp_path):
    """Dataset options live in the spec, so --alpha / --beta are free for an algorithm (MAML)."""
    from fedjax_lab import algorithms
    from fedjax_lab.algorithms.fedavg import FEDAVG, server_averaging
    from fedjax_lab.core.setup import Setup, defaults
    seen = {}

    @defaults(FEDAVG)
    def toy(model, *, alpha: float = 0.1, beta: float = 0.2, setup: Setup = Setup()):
        seen.update(alpha=alpha, beta=beta)
        return server_averaging(model, setup, toy, alpha=alpha, beta=beta)

    monkeypatch.setitem(algorithms.ALGORITHMS, "toy", (toy, "a toy with alpha and beta"))
    flags = set(cli._valid_flags(cli.run_parser("toy", toy)))
    assert {"--alpha", "--beta"} <= flags
    cli.main(["run", "toy", "--alpha", "0.5", "--beta", "0.7", "--dataset",
              "synthetic:alpha=1,beta=1,clients=6", "--clients-per-round", "3", "--local-steps", "2",
              "--rounds", "1", "--eval-every", "1", "--no-progress", "--out", str(tmp_path)])
    assert seen == {"alpha": 0.5, "beta": 0.7}
    config = json.load(open(tmp_path / "config.json"))
    assert config["alpha"] == 0.5 and config["dataset"] == "synthetic:alpha=1,beta=1,clients=6"


def test_a_hyperparameter_that_shadows_a_shared_flag_is_refused():
    from fedjax_lab.algorithms.fedavg import FEDAVG
    from fedjax_lab.core.setup import Setup, defaults

    @defaults(FEDAVG)
    def bad(model, *, client_lr: float = 0.1, setup: Setup = Setup()):
        raise AssertionError("never built")
    with pytest.raises(ValueError, match=r"keyword\(s\) \['client_lr'\] collide"):
        cli.run_parser("bad", bad)


@pytest.mark.parametrize("old,new", [
    (["--alpha", "1", "--beta", "1"], "--dataset synthetic:alpha=A,beta=B"),
    (["--num-clients", "8"], "--dataset synthetic:clients=N"),
    (["--trim-beta", "0.2"], "--aggregator trimmed_mean --aggregator-beta B"),
    (["--krum-f", "1"], "--aggregator krum --aggregator-f F"),
])
def test_old_flags_fail_naming_their_new_form(old, new):
    with pytest.raises(SystemExit, match="is now " + new.replace("(", r"\(").replace(")", r"\)")):
        cli.main(["run", "fedavg", *old, "--rounds", "1", "--no-progress"])


def test_aggregator_options_come_from_the_chosen_aggregator(tmp_path):
    out = str(tmp_path / "run")
    cli.main(["run", "fedavg", "--aggregator", "trimmed_mean", "--aggregator-beta", "0.25",
              "--attack", "sign_flip", "--attack-fraction", "0.2", "--dataset",
              "synthetic:alpha=1,beta=1,clients=10", "--clients-per-round", "8",
              "--local-steps", "2", "--rounds", "1", "--eval-every", "1", "--no-progress",
              "--out", out])
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["aggregator"] == "trimmed_mean" and config["aggregator_beta"] == 0.25
    assert config["attack"] == "sign_flip" and config["attack_fraction"] == 0.2
    with pytest.raises(SystemExit, match=r"unknown flag\(s\) --aggregator-beta"):
        cli.main(["run", "fedavg", "--aggregator", "median", "--aggregator-beta", "0.2"])


@pytest.mark.parametrize("fmt", ["json", "toml"])
def test_config_file_reruns_a_run_exactly_and_flags_override_it(fmt, tmp_path):
    first = str(tmp_path / "first")
    common = ["--dataset", "synthetic:alpha=1,beta=1,clients=8", "--rounds", "2",
              "--eval-every", "1", "--no-progress"]
    cli.main(["run", "fedprox", "--mu", "0.5", "--stragglers", "0.5", "--clients-per-round", "4",
              "--local-steps", "3", "--uplink", "top_k", "--uplink-k", "20", *common, "--out", first])
    config = json.load(open(os.path.join(first, "config.json")))
    if fmt == "toml":
        path = tmp_path / "c.toml"
        path.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in config.items()
                                  if v is not None and not isinstance(v, list)))
    else:
        path = os.path.join(first, "config.json")
    again = str(tmp_path / "again")
    cli.main(["run", "--config", str(path), "--out", again, "--no-progress"])
    assert open(os.path.join(first, "metrics.jsonl")).read() == \
        open(os.path.join(again, "metrics.jsonl")).read()
    other = str(tmp_path / "other")
    cli.main(["run", "--config", str(path), "--mu", "2.0", "--out", other, "--no-progress"])
    assert json.load(open(os.path.join(other, "config.json")))["mu"] == 2.0
    assert open(os.path.join(first, "metrics.jsonl")).read() != \
        open(os.path.join(other, "metrics.jsonl")).read()


def test_config_file_errors_name_the_file_and_the_key(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"mu": 1, "learning_rate": 0.1}')
    with pytest.raises(SystemExit, match=r"bad.json: unknown key\(s\) \['learning_rate'\]"):
        cli.main(["run", "fedprox", "--config", str(bad)])
    bad.write_text("{not json")
    with pytest.raises(SystemExit, match="could not read it as JSON"):
        cli.main(["run", "fedprox", "--config", str(bad)])
