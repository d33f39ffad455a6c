"""The sweep's round program stays dense in the run axis (issue 28), checked on its jaxpr (no
compilation, a few seconds).

Small models (logistic): the runs are one vmapped axis (no sequential loop over them), and the
per-run batch drawing sorts only the keys the runs read: the full-width argsort of every pass was
44% of a logistic FedProx round on Synthetic(1,1) and a per-run cost that stacking runs does not
make denser (experiments/PERF.md). Large models, whose clients run as a lax.map on one CPU device
(core/local.py): the runs are a lax.map too, so no client op is batched over the runs (batched
matmuls and convolutions made the MLP and CNN sweeps slower per run than sequential fl.run's).
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab import Setup, algorithms, models
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


def _round_jaxpr(model, data, setup, runs, *, as_sweep=True):
    """jaxpr of one sweep round of FedProx over `runs` values of mu; as_sweep=False keeps the runs
    a vmap whatever the clients do (the code before issue 28)."""
    program = sw.Program(factory=algorithms.fedprox, model=model, static=(), traced=("mu",),
                         kinds=(("mu", "factory"),), setup=setup)
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
