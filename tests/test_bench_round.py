"""The round benchmark's core (tiny setting, no timing thresholds) and the exactness of the fast
epoch permutations it motivated (core/batching.py)."""
import importlib.util
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lab.core.batching import PACKED_SORT_MAX_WIDTH, epoch_permutations

_PATH = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "bench_round.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_round", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_setting_record(bench):
    C, S, B = 4, 3, 5
    rec = bench.bench_setting("logistic", C, num_clients=6, per_client=12, local_steps=S,
                              batch_size=B, reps=1, step_loop_clients=2,
                              peak_gflops=bench.dot_peak_gflops(sizes=(64,), reps=1))
    for k in ("setting", "C", "round_ms", "loop_ms", "naive_ms", "step_loop_ms", "r_client",
              "r_naive", "r_step", "gflops", "peak_gflops", "flops_frac", "batch_ms", "batch_share"):
        assert k in rec, k
    assert rec["setting"] == "logistic" and rec["C"] == C
    for k in ("round_ms", "loop_ms", "naive_ms", "step_loop_ms", "r_client", "r_naive", "r_step",
              "gflops", "peak_gflops", "flops_frac", "batch_ms"):
        assert math.isfinite(rec[k]) and rec[k] > 0, (k, rec[k])
    np.testing.assert_allclose(rec["r_client"], rec["loop_ms"] / rec["round_ms"], rtol=1e-2)
    np.testing.assert_allclose(rec["r_naive"], rec["naive_ms"] / rec["round_ms"], rtol=1e-2)
    # the per-client loop is the same FedAvg round (same batches and keys), to float rounding
    assert rec["loop_vs_round_max_abs"] < 1e-5
    # the FLOP count includes every local step (XLA's cost analysis alone counts a loop body once):
    # forward x W and backward x^T g of the 60 -> 10 logistic model are 4 C S B d k FLOPs
    matmul = 4 * C * S * B * 60 * 10
    assert matmul <= rec["gflop"] * 1e9 + 1 and rec["gflop"] * 1e9 < 3 * matmul


def _argsort_reference(key, n, passes, width):
    """The permutations as core/batching.py drew them before (argsort of padded uniforms)."""
    u = jax.random.uniform(key, (passes, width))
    u = jnp.where(jnp.arange(width) < n, u, 2.0)
    return jnp.argsort(u, axis=1).astype(jnp.int32)


@pytest.mark.parametrize("width", [1, 2, 7, 50, 256, 257, PACKED_SORT_MAX_WIDTH,
                                   PACKED_SORT_MAX_WIDTH + 1])
def test_epoch_permutations_equal_argsort(width):
    for n in sorted({0, 1, width // 2, width}):
        key = jax.random.key(width * 7 + n)
        got = epoch_permutations(key, jnp.int32(n), passes=3, width=width)
        np.testing.assert_array_equal(got, _argsort_reference(key, n, 3, width))
        np.testing.assert_array_equal(np.sort(np.asarray(got)[:, :n], axis=1),
                                      np.broadcast_to(np.arange(n), (3, n)))


def test_epoch_permutations_break_ties_like_a_stable_argsort():
    # 400 keys of 23 bits per row tie with probability ~1%: 300 rows hold a few ties
    key, passes, width, n = jax.random.key(11), 300, PACKED_SORT_MAX_WIDTH, 400
    u = np.asarray(jax.random.uniform(key, (passes, width)))[:, :n]
    ties = sum(len(np.unique(r)) < n for r in u)
    assert ties > 0
    np.testing.assert_array_equal(epoch_permutations(key, n, passes=passes, width=width),
                                  _argsort_reference(key, n, passes, width))


@pytest.mark.parametrize("width,positions", [(7, 20), (300, 200), (800, 200), (1500, 640)])
def test_epoch_permutations_read_by_a_client_equal_argsort(width, positions):
    """positions=S*B (only what a client reads, its random bits computed only there) gives the
    reached rows' first columns of the full argsort, for typed and raw threefry keys."""
    for n in sorted({1, 45, width // 3, width}):
        if n > width:
            continue
        passes = -(-positions // n)
        for key in (jax.random.key(n), jax.random.PRNGKey(n + 1)):
            got = np.asarray(jax.jit(lambda k: epoch_permutations(
                k, jnp.int32(n), passes=passes, width=width, positions=positions))(key))
            want = np.asarray(_argsort_reference(key, n, passes, width))
            k = min(positions, width)
            for p in range(passes):
                if p * n < positions:                     # a pass the stream reaches
                    cols = min(k, n, positions - p * n)
                    np.testing.assert_array_equal(got[p, :cols], want[p, :cols],
                                                  err_msg=f"n={n} pass {p}")


def test_threefry2x32_equals_jax_primitive():
    from jax.extend.random import threefry2x32_p
    from fedjax_lab.core.batching import threefry2x32
    words = jax.random.bits(jax.random.key(0), (4, 1000), jnp.uint32)
    got = jax.jit(threefry2x32)(words[0, 0], words[1, 0], words[2], words[3])
    want = threefry2x32_p.bind(words[0, 0], words[1, 0], words[2], words[3])
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_clients_map_equals_vmap_with_stragglers_and_extra_loss():
    """local_train(clients="map") (the CPU layout for large models) gives vmap's numbers."""
    import optax

    from fedjax_lab import models
    from fedjax_lab.core.local import local_train
    from fedjax_lab.data import federated_arrays

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 6)).astype(np.float32), rng.integers(0, 3, 40)
    data = federated_arrays(x, y, np.array([0, 5, 17, 30, 40]), num_classes=3)
    model = models.mlp(3, hidden=(8,))
    params = model.init(jax.random.key(0), data.x[:1])
    idx = jnp.asarray(rng.integers(0, 40, (4, 3, 3)), jnp.int32)
    mask = jnp.asarray(np.arange(3)[None, :] < np.array([3, 1, 0, 2])[:, None])
    keys = jax.random.split(jax.random.key(1), 4)
    prox = lambda w: 0.05 * sum(jnp.sum(v ** 2) for v in jax.tree.leaves(w))
    out = {}
    for clients, chunk in [("vmap", 1), ("map", 1), ("map", 3)]:
        train = local_train(model, optax.adam(0.05), extra_loss=prox, clients=clients, chunk=chunk)
        out[clients, chunk] = jax.jit(jax.vmap(train, in_axes=(None, None, None, 0, 0, 0)))(
            params, data.x, data.y, idx, mask, keys)
    # a plain per-client reference loop, unjitted
    train = local_train(model, optax.adam(0.05), extra_loss=prox, clients="vmap")
    ref = [train(params, data.x, data.y, idx[c], mask[c], keys[c]) for c in range(4)]
    for res in out.values():
        for c in range(4):
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a[c], b, atol=1e-5),
                         res.params, ref[c].params)
            np.testing.assert_allclose(res.loss[c], ref[c].loss, atol=1e-5)
    # a client with no real steps keeps w_t exactly
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[2], b), out["map", 1].params, params)


def test_local_train_rejects_bad_client_layout():
    import optax

    from fedjax_lab import models
    from fedjax_lab.core.local import local_train
    with pytest.raises(ValueError, match="clients"):
        local_train(models.logistic(3), optax.sgd(0.1), clients="pmap")
    with pytest.raises(ValueError, match="chunk"):
        local_train(models.logistic(3), optax.sgd(0.1), clients="map", chunk=0)
