"""run(): determinism, exact resumption, compile-once, non-finite loss, checkpoint errors; the
data loss and the full local objective as separate metrics."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lab import Setup, algorithms, models, run
from fedjax_lab.core.driver import run_rounds
from tests.conftest import count_compiles


def _alg(mu=0.1, **kw):
    args = dict(client_lr=0.05, clients_per_round=4, local_steps=5, batch_size=8, stragglers=0.5)
    args.update(kw)
    return algorithms.fedprox(models.logistic(10), mu=mu, setup=Setup.of(**args))


def _lines(path):
    with open(os.path.join(path, "metrics.jsonl")) as f:
        return f.read().splitlines()


def test_same_seed_gives_identical_metrics(tmp_path, synthetic_small):
    alg = _alg()
    run(alg, synthetic_small, rounds=6, key=3, eval_every=2, out=str(tmp_path / "a"), progress=False)
    run(_alg(), synthetic_small, rounds=6, key=3, eval_every=2, out=str(tmp_path / "b"),
        progress=False)
    a, b = _lines(tmp_path / "a"), _lines(tmp_path / "b")
    assert len(a) == 3 and a == b
    rec = json.loads(a[-1])
    for k in ("round", "train_loss", "test_loss", "test_accuracy", "test_accuracy_p10",
              "test_accuracy_p50", "test_accuracy_p90", "total_bytes_up"):
        assert k in rec
    other = run(alg, synthetic_small, rounds=6, key=4, eval_every=2, progress=False)
    assert other.history[-1]["train_loss"] != rec["train_loss"]


def test_resume_equals_uninterrupted(tmp_path, synthetic_small):
    alg = _alg()
    run(alg, synthetic_small, rounds=8, key=1, eval_every=2, out=str(tmp_path / "full"),
        progress=False)
    # interrupted at round 4 (checkpoint), then resumed to 8
    run(alg, synthetic_small, rounds=4, key=1, eval_every=2, checkpoint_every=4,
        out=str(tmp_path / "cut"), progress=False)
    res = run(alg, synthetic_small, rounds=8, key=1, eval_every=2, checkpoint_every=4,
              out=str(tmp_path / "cut"), resume=True, progress=False)
    assert _lines(tmp_path / "cut") == _lines(tmp_path / "full")
    assert [h["round"] for h in res.history] == [2, 4, 6, 8]


def test_resume_drops_metrics_written_after_the_checkpoint(tmp_path, synthetic_small):
    alg = _alg()
    out = str(tmp_path / "r")
    run(alg, synthetic_small, rounds=6, key=1, eval_every=2, checkpoint_every=4, out=out,
        progress=False)          # checkpoints at 4 and 6
    ref = _lines(out)
    # simulate a crash after round 4's checkpoint: remove the round-6 checkpoint
    import shutil
    shutil.rmtree(os.path.join(out, "checkpoints", "6"))
    run(alg, synthetic_small, rounds=6, key=1, eval_every=2, checkpoint_every=4, out=out,
        resume=True, progress=False)
    assert _lines(out) == ref


def test_resume_without_checkpoint_fails(tmp_path, synthetic_small):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run(_alg(), synthetic_small, rounds=4, key=0, eval_every=2, out=str(tmp_path),
            resume=True, progress=False)


def test_resume_with_different_config_says_what_differs(tmp_path, synthetic_small):
    run(_alg(), synthetic_small, rounds=2, key=0, eval_every=2, checkpoint_every=2,
        out=str(tmp_path), progress=False)
    with pytest.raises(ValueError, match=r"mu: checkpoint has 0\.1, this run has 0\.5"):
        run(_alg(mu=0.5), synthetic_small, rounds=4, key=0, eval_every=2, checkpoint_every=2,
            out=str(tmp_path), resume=True, progress=False)
    with pytest.raises(ValueError, match="key: checkpoint has"):
        run(_alg(), synthetic_small, rounds=4, key=9, eval_every=2, checkpoint_every=2,
            out=str(tmp_path), resume=True, progress=False)


def test_non_finite_loss_stops_with_the_round(synthetic_small):
    alg = _alg(client_lr=1e30, stragglers=0.0)
    with pytest.raises(FloatingPointError, match=r"at round \d+"):
        run(alg, synthetic_small, rounds=6, key=0, eval_every=3, progress=False)


def test_non_finite_local_objective_stops_with_the_round(synthetic_small):
    # the data loss can stay finite while the regularizer overflows; the driver checks both
    alg = _alg(stragglers=0.0)

    def round_(state, data, key):
        state, metrics = alg.round(state, data, key)
        bad = jnp.where(state.round == 2, jnp.inf, metrics["local_objective"])
        return state, dict(metrics, local_objective=bad)

    with pytest.raises(FloatingPointError, match=r"local_objective\) at round 2"):
        run(dataclasses.replace(alg, round=round_), synthetic_small, rounds=6, key=0,
            eval_every=3, progress=False)


def test_diverging_personal_models_stop_the_run(synthetic_small):
    from fedjax_lab.algorithms import ditto
    alg = ditto(models.logistic(synthetic_small.num_classes), lam=0.1, personal_lr=1e30,
                setup=Setup.of(clients_per_round=4, local_steps=3, batch_size=5))
    with pytest.raises(FloatingPointError, match=r"personal_(loss|objective)\) at round 1"):
        run(alg, synthetic_small, rounds=4, key=0, eval_every=2, progress=False)


@pytest.mark.parametrize("mu", [0.0, 1.0])
def test_fedprox_reports_data_loss_and_local_objective(mu, synthetic_small):
    # local_loss is F_k; local_objective adds mu/2 ||w - w_t||^2, which is > 0 after the first
    # local step when mu > 0 and exactly 0 when mu = 0
    alg = _alg(mu=mu, stragglers=0.0)
    state = alg.init(jax.random.key(0), synthetic_small)
    _, m = jax.jit(alg.round)(state, synthetic_small, jax.random.key(1))
    loss, objective = float(m["local_loss"]), float(m["local_objective"])
    assert np.isfinite(loss) and loss > 0
    if mu == 0:
        assert objective == loss
    else:
        assert objective > loss


def test_rounds_and_runs_compile_once(synthetic_small):
    alg = _alg()
    before = run_rounds._cache_size()
    run(alg, synthetic_small, rounds=6, key=0, eval_every=2, progress=False)   # 3 chunks
    assert run_rounds._cache_size() == before + 1
    with count_compiles() as compiles:
        run(alg, synthetic_small, rounds=6, key=5, eval_every=2, progress=False)
    assert compiles == []


@pytest.mark.parametrize("kw, match", [
    (dict(rounds=0), "rounds"), (dict(eval_every=0), "eval_every"),
    (dict(checkpoint_every=3, eval_every=2, out="x"), "multiple of eval_every"),
    (dict(resume=True), "needs out"),
])
def test_bad_run_arguments(kw, match, synthetic_small):
    args = dict(rounds=4, key=0, eval_every=2, progress=False)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        run(_alg(), synthetic_small, **args)
