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
    cli.main(["run", "fedprox", "--dataset", "synthetic", "--alpha", "1", "--beta", "1",
              "--num-clients", "8", "--rounds", "4", "--eval-every", "2", "--seed", "0",
              "--out", out, "--mu", "1", "--stragglers", "0.5", "--clients-per-round", "4",
              "--local-steps", "3", "--batch-size", "5", "--client-lr", "0.02", "--no-progress"])
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["mu"] == 1.0 and config["stragglers"] == 0.5 and config["client_lr"] == 0.02
    assert config["dataset_options"] == {"alpha": 1.0, "beta": 1.0, "num_clients": 8}
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["round"] for r in rows] == [2, 4]
    for key in ("train_loss", "test_loss", "test_accuracy", "test_accuracy_p10",
                "test_accuracy_p50", "test_accuracy_p90"):
        assert key in rows[-1]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["round"] == 4


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_factory_keyword_is_a_flag(name):
    factory = ALGORITHMS[name][0]
    parser = cli._run_parser(name, factory)
    flags = set(cli._valid_flags(parser))
    for pname, _, _ in cli._factory_params(factory):
        assert "--" + pname.replace("_", "-") in flags


def test_flag_types_come_from_the_signature():
    parser = cli._run_parser("fedprox", ALGORITHMS["fedprox"][0])
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
