"""fl.sweep: 4 values x 3 seeds compile once and equal the 12 separate fl.run's (metrics.jsonl
records); chunking and padding give the same numbers; a killed sweep resumes to the same files;
discrete names fall back to one program per value; grid names are validated; the CLI writes
per-run metrics, summary.csv and a figure."""
import csv
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from fedjax_lab import Setup, algorithms, models, run, sweep
from fedjax_lab.core import sweep as sw
from tests.conftest import count_compiles

MUS = [0.0, 0.01, 0.1, 1.0]
SEEDS = [0, 1, 2]
FLAT = dict(client_lr=0.1, clients_per_round=3, local_steps=3, batch_size=4, stragglers=0.4)
SETUP = Setup.of(**FLAT)
MODEL = models.logistic(3)
ROUNDS = dict(rounds=4, eval_every=2)


def _lines(path):
    with open(os.path.join(path, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _assert_same_records(a, b, rtol=1e-5):
    assert len(a) == len(b) and len(a) > 0
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            np.testing.assert_allclose(ra[k], rb[k], rtol=rtol, atol=1e-7, err_msg=k)


@pytest.fixture(scope="module")
def mu_sweep(tiny_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sweep"))
    before = sw.sweep_rounds._cache_size()
    result = sweep(algorithms.fedprox, tiny_data, model=MODEL, setup=SETUP, grid={"mu": MUS},
                   seeds=SEEDS, out=out, progress=False, **ROUNDS)
    return result, out, sw.sweep_rounds._cache_size() - before


def _check_against_runs(result, out, mus, data, tmp_path):
    for mu in mus:
        m = MUS.index(mu)
        alg = algorithms.fedprox(MODEL, mu=mu, setup=SETUP)     # one fl.run program per mu
        for seed in SEEDS:
            i = m * len(SEEDS) + seed
            ref = run(alg, data, key=seed, progress=False, out=str(tmp_path / str(i)),
                      **ROUNDS)
            _assert_same_records(result.runs[i].history, ref.history)
            _assert_same_records(_lines(os.path.join(out, result.run_names[i])), ref.history)
            with open(tmp_path / str(i) / "config.json") as f, \
                    open(os.path.join(out, result.run_names[i], "config.json")) as g:
                assert json.load(f) == json.load(g)
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                         result.runs[i].state.params, ref.state.params)


def test_sweep_compiles_once_and_equals_the_separate_runs(mu_sweep, tiny_data, tmp_path):
    """The 4 x 3 sweep is one program; its mu = 1 rows are those of fl.run (the other three
    values: the slow test below)."""
    result, out, programs = mu_sweep
    assert programs == 1 and len(result.programs) == 1 and len(result.runs) == 12
    assert [(p["mu"], s) for p, s in zip(result.points, result.seeds)] == \
        [(m, s) for m in MUS for s in SEEDS]
    _check_against_runs(result, out, [1.0], tiny_data, tmp_path)
    # mu and the seed matter: all 12 runs differ
    finals = [r.history[-1]["train_loss"] for r in result.runs]
    assert len(set(np.round(finals, 6))) == 12


@pytest.mark.slow
def test_every_row_of_the_4_by_3_sweep_equals_its_run(mu_sweep, tiny_data, tmp_path):
    result, out, _ = mu_sweep
    _check_against_runs(result, out, MUS[:3], tiny_data, tmp_path)


def test_a_second_sweep_with_other_values_and_seeds_compiles_nothing(mu_sweep, tiny_data):
    with count_compiles() as compiles:
        other = sweep(algorithms.fedprox, tiny_data, model=MODEL, setup=SETUP,
                      grid={"mu": [0.5, 0.02, 0.3, 2.0]}, seeds=[5, 6, 7], progress=False,
                      **ROUNDS)
    assert compiles == []
    assert other.runs[0].history[-1]["train_loss"] != mu_sweep[0].runs[0].history[-1]["train_loss"]


@pytest.mark.slow
def test_a_chunked_sweep_killed_and_resumed_equals_the_whole_sweep(mu_sweep, tiny_data, tmp_path,
                                                                   monkeypatch):
    """Chunks of 5, 5 and 2 (padded to 5); killed in the second chunk after its checkpoint at
    round 2, resumed: the same metrics.jsonl and states as the unchunked, uninterrupted sweep."""
    result, _, _ = mu_sweep
    out = str(tmp_path / "killed")
    args = dict(model=MODEL, setup=SETUP, grid={"mu": MUS}, seeds=SEEDS, out=out,
                checkpoint_every=2, runs_per_chunk=5, progress=False, **ROUNDS)
    real = sw.sweep_rounds

    def dies_in_the_second_chunk_at_round_2(program, values, state, data, adapt, keys,
                                            first_round, length):
        if not isinstance(first_round, jax.core.Tracer) and int(first_round) == 2 \
                and np.isclose(float(values["mu"][0]), MUS[1]):    # run 5 = (mu 0.01, seed 2)
            raise KeyboardInterrupt
        return real(program, values, state, data, adapt, keys, first_round, length)
    monkeypatch.setattr(sw, "sweep_rounds", dies_in_the_second_chunk_at_round_2)
    with pytest.raises(KeyboardInterrupt):
        sweep(algorithms.fedprox, tiny_data, **args)
    monkeypatch.setattr(sw, "sweep_rounds", real)
    assert len(_lines(os.path.join(out, result.run_names[0]))) == 2       # chunk 1 finished
    assert len(_lines(os.path.join(out, result.run_names[5]))) == 1       # chunk 2 at round 2
    assert not os.path.exists(os.path.join(out, result.run_names[10]))    # chunk 3 not begun
    resumed = sweep(algorithms.fedprox, tiny_data, resume=True, **args)
    assert resumed.runs_per_chunk == 5
    for i, name in enumerate(resumed.run_names):
        assert name == result.run_names[i]
        _assert_same_records(_lines(os.path.join(out, name)), result.runs[i].history)
        _assert_same_records(resumed.runs[i].history, result.runs[i].history)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                     resumed.runs[i].state.params, result.runs[i].state.params)
    with pytest.raises(ValueError, match="different config"):
        sweep(algorithms.fedprox, tiny_data, resume=True,
              **dict(args, setup=Setup.of(**dict(FLAT, client_lr=0.07))))
    with pytest.raises(ValueError, match=r"chunk chunk_0_0 holds runs \['mu=0.0,seed=0', .*"
                                         r"the same runs_per_chunk"):
        sweep(algorithms.fedprox, tiny_data, resume=True, **dict(args, runs_per_chunk=4))


@pytest.mark.slow
def test_a_memory_budget_picks_the_chunk_size_with_the_same_numbers(mu_sweep, tiny_data):
    result, _, _ = mu_sweep
    args = dict(model=MODEL, setup=SETUP, grid={"mu": MUS[:2]}, seeds=SEEDS, progress=False,
                **ROUNDS)
    small = sweep(algorithms.fedprox, tiny_data, memory_budget=1, **args)      # 1 byte: 1 run
    large = sweep(algorithms.fedprox, tiny_data, memory_budget=1e10, **args)   # all 6 at once
    assert (small.runs_per_chunk, large.runs_per_chunk) == (1, 6)
    for a, b, c in zip(small.runs, large.runs, result.runs[:6]):
        _assert_same_records(a.history, c.history)
        _assert_same_records(b.history, c.history)


@pytest.mark.slow
def test_discrete_names_take_one_program_each(tiny_data):
    before = sw.sweep_rounds._cache_size()
    res = sweep(algorithms.fedavg, tiny_data, model=MODEL, setup=SETUP,
                grid={"local_steps": [2, 3], "client_lr": [0.02, 0.05]}, seeds=[0], rounds=1,
                eval_every=1, progress=False)
    # local_steps (int) is static, client_lr traced: 2 programs of 2 runs each
    assert res.programs == [{"local_steps": 2}, {"local_steps": 3}]
    assert sw.sweep_rounds._cache_size() - before == 2
    ref = run(algorithms.fedavg(MODEL, setup=Setup.of(**dict(FLAT, local_steps=3, client_lr=0.05))),
              tiny_data, rounds=1, key=0, eval_every=1, progress=False)
    _assert_same_records(res.runs[3].history, ref.history)


def test_a_float_the_algorithm_needs_as_a_number_is_found_static(tiny_data):
    """attack_fraction fixes round(fraction * N) attackers: tracing it fails, so it is static."""
    kinds = sw.check_names(algorithms.fedavg, ["client_lr", "attack_fraction", "attack"])
    base = dict(factory=algorithms.fedavg, model=MODEL, setup=SETUP,
                kinds=tuple(sorted((k, v[0]) for k, v in kinds.items())))
    point = {"client_lr": 0.05, "attack_fraction": 0.4}
    assert sw._traceable(base, ["client_lr", "attack_fraction"], point,
                         {"attack": "sign_flip"}, tiny_data) == ["client_lr"]


@pytest.mark.parametrize("kw, match", [
    (dict(grid={"nu": [0.1]}), r"grid: unknown name 'nu' for fedprox; valid names: .*client_lr.*mu"),
    (dict(grid={"mu": []}), r"grid\['mu'\] must be a non-empty list"),
    (dict(grid={"mu": [0.1, 0.1]}), r"grid\['mu'\] repeats a value"),
    (dict(grid={"mu": [0.1]}, fixed={"mu": 0.2}), "also in grid"),
    (dict(grid={"mu": [0.1, -1.0]}), "mu must be >= 0, got -1.0"),
    (dict(grid={"client_lr": [0.1, 0.0]}), "client_lr must be > 0"),
    (dict(grid={"mu": [0.1]}, seeds=[]), "seeds must be a non-empty list of ints"),
    (dict(grid={"mu": [0.1]}, runs_per_chunk=0), "runs_per_chunk must be > 0"),
    (dict(grid={"mu": [0.1]}, resume=True), "need out="),
    (dict(grid={"mu": [0.1]}, rounds=0), "rounds must be > 0"),
    (dict(grid={"mu": [0.1]}, devices=0), r"devices must be between 1 and \d+ \(the local devices\)"),
    (dict(grid={"mu": [0.1]}, devices="gpu"), "devices must be None, a count of local devices or "
                                              "a non-empty list of jax devices, got 'gpu'"),
    (dict(grid={"mu": [0.1]}, devices=[]), "devices must be None, a count"),
])
def test_bad_sweep_arguments_fail_before_compiling(kw, match, tiny_data):
    args = dict(model=MODEL, setup=SETUP, seeds=[0], rounds=2, eval_every=2, progress=False)
    args.update(kw)
    before = sw.sweep_rounds._cache_size()
    with pytest.raises(ValueError, match=match):
        sweep(algorithms.fedprox, tiny_data, **args)
    assert sw.sweep_rounds._cache_size() == before


def test_summary_rows_are_final_and_best_per_run_and_mean_std_per_point(mu_sweep):
    result, out, _ = mu_sweep
    runs, points = result.summary()
    assert len(runs) == 12 and len(points) == 4
    hist = result.runs[4].history
    acc = [h["test_accuracy"] for h in hist]
    assert runs[4]["final_test_accuracy"] == acc[-1] and runs[4]["best_test_accuracy"] == max(acc)
    assert runs[4]["best_train_loss"] == min(h["train_loss"] for h in hist)
    finals = [r.history[-1]["test_accuracy"] for r in result.runs[3:6]]     # mu = 0.01
    assert points[1]["mu"] == "0.01"
    np.testing.assert_allclose(points[1]["final_test_accuracy_mean"], np.mean(finals))
    np.testing.assert_allclose(points[1]["final_test_accuracy_std"], np.std(finals))
    path = sw.write_summary(result, out)
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert [r["kind"] for r in rows] == ["run"] * 12 + ["point"] * 4


@pytest.mark.slow
def test_cli_sweep_writes_runs_summary_and_figure_and_resumes(tmp_path, capsys):
    from fedjax_lab import cli
    out = str(tmp_path / "cli")
    argv = ["sweep", "fedprox", "--dataset", "synthetic:clients=6", "--grid", "mu=0,1",
            "--seeds", "0,1", "--rounds", "2", "--eval-every", "1", "--clients-per-round", "3",
            "--local-steps", "2", "--batch-size", "4", "--out", out, "--no-progress"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "4 runs, 1 compiled program(s)" in printed and "mu=0.0: final test_accuracy" in printed
    names = sorted(d for d in os.listdir(out) if not d.startswith("_") and
                   os.path.isdir(os.path.join(out, d)))
    assert names == ["mu=0.0,seed=0", "mu=0.0,seed=1", "mu=1.0,seed=0", "mu=1.0,seed=1"]
    first = _lines(os.path.join(out, "mu=1.0,seed=1"))
    assert [r["round"] for r in first] == [1, 2]
    assert os.path.exists(os.path.join(out, "summary.csv"))
    assert os.path.getsize(os.path.join(out, "sweep.png")) > 1000
    # the run's config.json re-runs it with `fedjax-lab run --config` (same data seed, its key)
    rerun = str(tmp_path / "rerun")
    assert cli.main(["run", "--config", os.path.join(out, "mu=1.0,seed=1", "config.json"),
                     "--out", rerun, "--no-progress"]) == 0
    _assert_same_records(_lines(rerun), first)
    assert cli.main(argv + ["--resume"]) == 0            # finished chunks are skipped
    assert _lines(os.path.join(out, "mu=1.0,seed=1")) == first
    with pytest.raises(SystemExit, match="unknown name 'nu'"):
        cli.main(["sweep", "fedprox", "--grid", "nu=1,2", "--out", out])
    with pytest.raises(SystemExit, match="needs --out"):
        cli.main(["sweep", "fedprox", "--grid", "mu=1,2"])


def test_cli_sweep_gives_jax_a_cpu_device_per_core_before_it_starts(capsys):
    """The CLI's sweep spreads its runs over one CPU device per core (--cpu-devices N instead),
    set before jax's backends start; in a process where jax has started, the flag is noted."""
    from fedjax_lab import cli
    with pytest.raises(SystemExit, match="--cpu-devices must be >= 1, got 0"):
        cli._cpu_devices(["fedprox", "--cpu-devices", "0"])
    before = jax.device_count()
    cli._cpu_devices(["fedprox", "--cpu-devices", "3"])          # jax has started in this process
    assert "no effect" in capsys.readouterr().err and jax.device_count() == before
    code = ("import jax, os; from fedjax_lab import cli; cli._cpu_devices(['fedprox']); "
            "print(jax.config.jax_num_cpu_devices, len(os.sched_getaffinity(0))); "
            "cli._cpu_devices(['fedprox', '--cpu-devices', '3']); print(jax.device_count())")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-c", code], env=dict(env, JAX_PLATFORMS="cpu"),
                          capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    default, cores, forced = proc.stdout.split()
    assert default == cores and forced == "3"
