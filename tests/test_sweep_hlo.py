"""The sweep's round program stays dense in the run axis (issue 28), checked on its jaxpr (no
compilation, a few seconds); runs that share a seed draw their cohorts and batches once.

Small models (logistic): the runs are one vmapped axis (no sequential loop over them), and the
per-run batch drawing sorts only the keys the runs read: the full-width argsort of every pass was
44% of a logistic FedProx round on Synthetic(1,1) and a per-run cost that stacking runs does not
make denser (experiments/PERF.md). Large models, whose clients run as a lax.map on one CPU device
(core/local.py): the runs are a lax.map too, so no client op is batched over the runs (batched
matmuls and convolutions made the MLP and CNN sweeps slower per run than sequential fl.run's).
"""
import dataclasses
import math

import pytest

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab import Cohort, LocalWork, Setup, algorithms, models
from fedjax_lab.core import rounds
from fedjax_lab.core import sweep as sw
from fedjax_lab.core.driver import _as_key
from fedjax_lab.data import federated_arrays, synthetic


def _eqns(jaxpr, names, out):
    """every equation whose primitive is in `names`, in `jaxpr` and the jaxprs nested in it"""
    for e in jaxpr.eqns:
        if e.primitive.name in names:
            out.append(e)
        for v in e.params.values():
            for sub in v if isinstance(v, (list, tuple)) else [v]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _eqns(inner, names, out)
    return out


def _round_jaxpr(model, data, setup, runs, *, as_sweep=True, seeds=0):
    """jaxpr of one sweep round of FedProx over `runs` values of mu; as_sweep=False keeps the runs
    a vmap whatever the clients do (the code before issue 28); seeds: Program.seeds."""
    program = sw.Program(factory=algorithms.fedprox, model=model, static=(), traced=("mu",),
                         kinds=(("mu", "factory"),), setup=setup, seeds=seeds)
    if as_sweep and sw.clients_mapped(program, {"mu": 0.1}, data):
        program = dataclasses.replace(program, runs_as_map=True)
    values = {"mu": jnp.linspace(0.0, 1.0, runs, dtype=jnp.float32)}
    keys = jnp.stack([jax.random.split(_as_key(s)[0])[1] for s in range(runs)])
    state = jax.eval_shape(lambda v, k: sw.sweep_init(program, v, data, k), values, keys)
    fn = lambda v, st, k: sw.sweep_rounds(program, v, st, data, None, k, jnp.int32(0), 1)
    return program, jax.make_jaxpr(fn)(values, state, keys).jaxpr


def test_logistic_sweep_vmaps_runs_and_sorts_only_what_they_read():
    runs, C, S, B = 7, 10, 20, 10
    data = synthetic(1.0, 1.0, num_clients=30, seed=0)          # client sizes 45 ... 800
    width, passes = data.max_client_size, math.ceil(S * B / data.min_client_size)
    assert width > 512 and passes > 1                           # the wide path, several passes
    setup = Setup.of(clients_per_round=C, local_steps=S, batch_size=B, stragglers=0.5)
    for many in (runs, 2 * sw.RUNS_PER_BLOCK_CPU + 3):          # one vmap; vmapped blocks
        program, jaxpr = _round_jaxpr(models.logistic(10), data, setup, many)
        assert not program.runs_as_map
        assert not [e for e in _eqns(jaxpr, {"scan", "while"}, [])
                    if e.params.get("length") == many], "a sequential loop over the runs"
    program, jaxpr = _round_jaxpr(models.logistic(10), data, setup, runs)
    sorted_keys = sum(math.prod(e.invars[0].aval.shape)
                      for e in _eqns(jaxpr, {"sort", "top_k"}, []))
    # what the batches read: pass 0 at full width, later passes only their first S * B keys; plus
    # the client sampling's shuffle of the population
    needed = runs * C * (width + (passes - 1) * min(S * B, width)) + 2 * runs * data.num_clients
    assert sorted_keys <= needed, (sorted_keys, needed, runs * C * passes * width)


def _sorted(eqns):
    return sum(math.prod(e.invars[0].aval.shape) for e in eqns)


def test_runs_that_share_a_seed_draw_their_cohorts_once():
    """12 runs of 3 seeds (Program.seeds = 3): the round draws for 3 keys, and for all 12 only in
    the branch taken when the keys are not 3 (a check in every round); without the seed count,
    12 draws and no such branch."""
    C, S, B, runs = 10, 20, 10, 12
    data = synthetic(1.0, 1.0, num_clients=30, seed=0)
    setup = Setup.of(clients_per_round=C, local_steps=S, batch_size=B, stragglers=0.5)
    _, plain = _round_jaxpr(models.logistic(10), data, setup, runs)
    _, shared = _round_jaxpr(models.logistic(10), data, setup, runs, seeds=3)
    assert not _eqns(plain, {"cond"}, [])
    conds = [e for e in _eqns(shared, {"cond"}, [])
             if any(_eqns(b.jaxpr, {"top_k", "sort"}, []) for b in e.params["branches"])]
    assert len(conds) == 1, "one check per round, around the draws"
    per_branch = sorted(_sorted(_eqns(b.jaxpr, {"top_k", "sort"}, [])) for b in conds[0].params["branches"])
    assert per_branch[1] == _sorted(_eqns(plain, {"top_k", "sort"}, []))    # all 12 keys
    assert per_branch[0] * runs == per_branch[1] * 3                        # 3 keys


@pytest.mark.parametrize("pattern", ["3 seeds", "12 seeds"])
def test_drawing_once_per_key_gives_every_row_its_own_draws(pattern):
    """participate vmapped over 12 keys under keys_repeat(3): the plain vmap's draws, whether the
    keys are 3 repeated (drawn 3 times) or 12 (the check fails and all 12 are drawn)."""
    data = synthetic(1.0, 1.0, num_clients=30, seed=0)
    cohort, work = Cohort(clients_per_round=10), LocalWork(local_steps=20, batch_size=10,
                                                           stragglers=0.5)
    seeds = [i % 3 for i in range(12)] if pattern == "3 seeds" else list(range(12))
    keys = jnp.stack([jax.random.key(s) for s in seeds])
    draw = jax.vmap(lambda k: rounds.participate(k, data, cohort, work))

    def shared(k):
        with rounds.keys_repeat(3):
            return draw(k)
    want, got = jax.jit(draw)(keys), jax.jit(shared)(keys)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_array_equal(a, b)
    assert len(set(map(tuple, np.asarray(got.ids).tolist()))) == len(set(seeds))


def test_sweep_of_a_large_model_batches_no_client_op_over_the_runs():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8 * 20, 784)).astype(np.float32)
    data = federated_arrays(x, rng.integers(0, 10, 8 * 20), np.arange(9) * 20, num_classes=10)
    setup = Setup.of(clients_per_round=2, local_steps=2, batch_size=4)
    model = models.mlp(10)                                      # >= MAP_MIN_PARAMS: a client map
    program, jaxpr = _round_jaxpr(model, data, setup, 3)
    batched = lambda jp: [e for e in _eqns(jp, {"dot_general"}, [])
                          if e.params["dimension_numbers"][1] != ((), ())]
    if jax.default_backend() != "cpu":
        assert not program.runs_as_map                          # accelerators: vmap everything
        return
    assert program.runs_as_map
    assert not batched(jaxpr), "matmuls batched over the runs"
    assert [e for e in _eqns(jaxpr, {"scan"}, []) if e.params["length"] == 3]
    # the check can fail: runs vmapped around the client map batch every matmul over them
    _, vmapped = _round_jaxpr(model, data, setup, 3, as_sweep=False)
    assert batched(vmapped)
