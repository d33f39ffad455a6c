"""Every algorithm works with its defaults (issue 23): `fedjax-lab run NAME` with no other flag runs
for every registered name, on the algorithm's own default model; on 2-label digits clients the
headline metric of every personalization and meta-learning method (adapted, else personalized
accuracy) beats FedAvg's global model after 60 rounds, and FedGen's global model is at least
FedAvg's under Dirichlet(0.1) label skew (slow; the numbers are the README's, from
experiments/defaults_table.py, which these tests share)."""
import functools
import importlib.util
import json
import os

import jax
import numpy as np
import pytest

from fedjax_lab import cli, models
from fedjax_lab.algorithms import ALGORITHMS
from fedjax_lab.core.setup import Setup, default_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 12 clients (>= every default cohort of 10), 10 features, 10 classes (110 logistic parameters >=
# FetchSGD's and local top-k's default k = 100), 20-40 examples each
TINY = "synthetic:1,1,clients=12,dim=10,classes=10,min_size=20,max_size=40"


def _table():
    spec = importlib.util.spec_from_file_location(
        "defaults_table", os.path.join(ROOT, "experiments", "defaults_table.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(argv, out):
    cli.main(["run"] + argv + ["--seed", "0", "--no-progress", "--out", str(out)])
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    with open(os.path.join(out, "config.json")) as f:
        return rows, json.load(f)


@functools.lru_cache(maxsize=None)
def tiny_data():
    from fedjax_lab.data import load
    return load(TINY)


# XLA:CPU at LLVM -O0: the same numbers here, half the compile time of a program run once.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_runs_with_its_defaults(name):
    """`factory(default model, setup=Setup())` builds, passes its data check, and init + 2 rounds
    run as one compiled program (one compilation per algorithm keeps the registry fast) with
    finite losses; the driver's evaluation of every name runs in the slow test below and in
    experiments/defaults_table.py, and through the CLI for FedGKT here."""
    from fedjax_lab.core.driver import run_rounds
    data = tiny_data()
    factory = ALGORITHMS[name][0]
    alg = factory(cli.make_model(None, data, factory), setup=Setup())
    assert alg.model.name.startswith(default_model(factory)), (alg.model.name, default_model(factory))
    if getattr(alg, "check", None) is not None:
        alg.check(data)

    def two_rounds(key):
        k_init, k_rounds = jax.random.split(key)
        return run_rounds(alg, alg.init(k_init, data), data, k_rounds, 0, 2)[1]
    key = jax.random.key(0)
    per_round = jax.device_get(jax.jit(two_rounds).lower(key).compile(FAST_COMPILE)(key))
    losses = {k: v for k, v in per_round.items() if k.endswith(("loss", "objective"))}
    assert losses, f"{name} reports no loss: {sorted(per_round)}"
    assert all(np.shape(v) == (2,) and np.all(np.isfinite(v)) for v in losses.values()), losses


def test_the_cli_runs_an_algorithm_on_its_own_model(tmp_path):
    """`fedjax-lab run fedgkt` with no --model ran the logistic model and failed; now the pair."""
    rows, config = _run(["fedgkt", "--dataset", TINY, "--rounds", "1", "--eval-every", "1"], tmp_path)
    assert config["model"] == "gkt" and rows[-1]["round"] == 1
    assert 0.0 <= _table().headline(rows[-1])[1] <= 1.0


def test_the_algorithm_picks_its_model_when_none_is_named():
    from fedjax_lab.algorithms import fedavg, fedgen, fedgkt, pfedhn_pc
    from fedjax_lab.models.gkt import GKTPair
    data = tiny_data()
    assert [default_model(f) for f in (fedgkt, pfedhn_pc, fedgen, fedavg)] == \
        ["gkt", "mlp", "mlp", "logistic"]
    assert isinstance(cli.make_model(None, data, fedgkt), GKTPair)
    assert cli.make_model(None, data, fedavg).name == "logistic"
    assert cli.make_model("mlp", data, fedavg).name == cli.make_model(None, data, pfedhn_pc).name
    with pytest.raises(ValueError, match="defaults.model=.... must be a model name"):
        from fedjax_lab.core.setup import defaults
        defaults(Setup(), model=models.logistic(3))


def test_run_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["run", "fedmeta_maml", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--inner-lr INNER_LR default: 0.5" in text and "--inner-steps INNER_STEPS default: 3" in text
    assert "--server-lr SERVER_LR default: 0.1" in text
    with pytest.raises(SystemExit):
        cli.main(["run", "fedgkt", "--help"])
    assert "default: 'gkt'" in capsys.readouterr().out


def test_reproduction_scripts_read_the_factories_defaults():
    """One source of the defaults: a script's flag default is the factory's default."""
    from fedjax_lab.algorithms import fedmeta_maml, perfedavg_fo
    from fedjax_lab.reproduce import default_of
    for script, factory, flags in (
            ("fedmeta", fedmeta_maml, ("inner_lr", "inner_steps", "server_lr", "clients_per_round")),
            ("perfedavg", perfedavg_fo, ("inner_lr", "client_lr", "local_steps", "batch_size"))):
        spec = importlib.util.spec_from_file_location(
            f"repro_{script}", os.path.join(ROOT, "experiments", "reproduce", f"{script}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        args = vars(module.parse([]))
        for flag in flags:
            assert args[flag] == default_of(factory, flag), (script, flag, args[flag])
    with pytest.raises(ValueError, match="default_of: fedmeta_maml has no default named 'nu'"):
        default_of(fedmeta_maml, "nu")


@pytest.mark.slow
def test_defaults_show_each_papers_mechanism_on_digits():
    """60 rounds, seed 0, `fedjax-lab run NAME` with defaults (experiments/defaults_table.py):
    every personalization / meta-learning method's adapted or personalized accuracy beats
    FedAvg's global model on digits:shards=2,clients=20, and FedGen's global model is at least
    FedAvg's on digits:dirichlet=0.1,clients=20. Global-model methods are not compared here."""
    table = _table()
    rounds = 60
    ref = {d: table.headline(table.run_default("fedavg", d, rounds=rounds))[1]
           for d in (table.SHARDS, table.DIRICHLET)}
    losing = {}
    for name in sorted(ALGORITHMS):
        if name == "fedavg":
            continue
        metric, acc = table.headline(table.run_default(name, table.SHARDS, rounds=rounds))
        if metric != "test_accuracy" and not acc > ref[table.SHARDS]:
            losing[name] = (metric, acc, ref[table.SHARDS])
    for name in table.ALSO_ON_DIRICHLET:
        _, acc = table.headline(table.run_default(name, table.DIRICHLET, rounds=rounds))
        if not acc >= ref[table.DIRICHLET]:
            losing[f"{name}@dirichlet"] = ("test_accuracy", acc, ref[table.DIRICHLET])
    assert not losing, f"below FedAvg's global model with defaults: {losing}"
