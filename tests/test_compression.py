"""fedjax_lab.compression: count sketch against an independent numpy count sketch, heavy-hitter
recovery rates, linearity (hypothesis), sparsifiers, quantizers, bytes and errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedjax_lab import compression as cz

# jitted once per shape: eager dispatch of every small op would dominate these tests' time
sketch = jax.jit(cz.sketch)
unsketch = jax.jit(cz.unsketch)
heavy_hitters = jax.jit(cz.heavy_hitters, static_argnums=2)


# ---------------------------------------------------------------- independent numpy count sketch
def np_lowbias32(x):
    x = np.asarray(x, np.uint64) & 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


class NumpyCountSketch:
    """Plain numpy count sketch with the same seeds (loops over rows, np.add.at, np.median)."""

    def __init__(self, seeds, dim, rows, cols):
        seeds = np.asarray(seeds, np.uint64)
        i = np.arange(dim, dtype=np.uint64)
        self.buckets = np.stack([np_lowbias32(i ^ seeds[j, 0]) % cols for j in range(rows)])
        self.signs = np.stack([np.where(np_lowbias32(i ^ seeds[j, 1]) >> 31, -1.0, 1.0)
                               for j in range(rows)])
        self.rows, self.cols = rows, cols

    def sketch(self, v):
        table = np.zeros((self.rows, self.cols))
        for j in range(self.rows):
            np.add.at(table[j], self.buckets[j].astype(np.int64), self.signs[j] * v)
        return table

    def estimate(self, table):
        est = np.stack([self.signs[j] * table[j, self.buckets[j].astype(np.int64)]
                        for j in range(self.rows)])
        return np.median(est, axis=0)

    def heavy(self, table, k):
        est = self.estimate(table)
        idx = np.argsort(-np.abs(est), kind="stable")[:k]
        return idx, est[idx]


def planted(seed, dim, k, heavy=10.0, noise=0.01):
    """A vector whose k planted coordinates carry most of the l2 mass."""
    rng = np.random.default_rng(seed)
    v = rng.normal(0, noise, dim)
    idx = rng.choice(dim, k, replace=False)
    v[idx] = heavy * rng.choice([-1.0, 1.0], k) * (1 + rng.random(k))
    return v.astype(np.float32), idx


def test_sketch_query_and_heavy_hitters_match_numpy_reference():
    d, r, c, k = 3000, 5, 200, 10
    cs = cz.count_sketch(jax.random.key(4), d, rows=r, cols=c)
    ref = NumpyCountSketch(np.asarray(cs.seeds), d, r, c)
    v, planted_idx = planted(0, d, k)
    table = np.asarray(sketch(cs, jnp.asarray(v)))
    np.testing.assert_allclose(table, ref.sketch(v.astype(np.float64)), atol=1e-4)
    b, s = cz.hashes(cs, jnp.arange(d))
    np.testing.assert_array_equal(np.asarray(b), ref.buckets.astype(np.int64))
    np.testing.assert_array_equal(np.asarray(s), ref.signs)
    np.testing.assert_allclose(np.asarray(unsketch(cs, jnp.asarray(table))),
                               ref.estimate(table), atol=1e-5)
    idx, vals = heavy_hitters(cs, jnp.asarray(table), k)
    ridx, rvals = ref.heavy(table, k)
    np.testing.assert_array_equal(np.asarray(idx), ridx)
    np.testing.assert_allclose(np.asarray(vals), rvals, atol=1e-4)
    assert set(ridx.tolist()) == set(planted_idx.tolist())
    np.testing.assert_allclose(np.asarray(vals), v[ridx], rtol=0.02)


def recovery_rate(cols, *, trials=20, d=5000, k=20, rows=5):
    hits = 0
    for t in range(trials):
        v, idx = planted(100 + t, d, k, heavy=1.0, noise=0.02)
        cs = cz.count_sketch(jax.random.key(t), d, rows=rows, cols=cols)
        found, _ = heavy_hitters(cs, sketch(cs, jnp.asarray(v)), k)
        hits += len(set(np.asarray(found).tolist()) & set(idx.tolist()))
    return hits / (trials * k)


def test_heavy_hitter_recovery_rate_with_enough_columns():
    # k = 20 heavy coordinates carry ~92% of the l2 mass of a d = 5000 vector.
    v, idx = planted(100, 5000, 20, heavy=1.0, noise=0.02)
    assert np.sum(v[idx] ** 2) / np.sum(v ** 2) > 0.9
    assert recovery_rate(cols=1000) >= 0.99         # c = 50 k: recovered w.h.p.
    assert recovery_rate(cols=10) < 0.7             # c < k: the test can fail


def test_second_round_returns_exact_values_of_the_best_candidates():
    d, k = 2000, 8
    v, idx = planted(3, d, k)
    cs = cz.count_sketch(jax.random.key(1), d, rows=3, cols=80)     # small: noisy estimates
    v = jnp.asarray(v)
    table = sketch(cs, v)
    est_idx, est_vals = heavy_hitters(cs, table, k)
    ex_idx, ex_vals = jax.jit(lambda cs, t, v: cz.heavy_hitters(
        cs, t, k, num_candidates=4 * k, exact=lambda i: v[i]))(cs, table, v)
    np.testing.assert_array_equal(np.asarray(ex_vals), np.asarray(v[ex_idx]))
    assert not np.allclose(np.asarray(est_vals), np.asarray(v[est_idx]), atol=1e-3)
    assert set(np.asarray(ex_idx).tolist()) == set(idx.tolist())          # all 8 found
    assert len(set(np.asarray(est_idx).tolist()) & set(idx.tolist())) < k  # one round misses some


_LINEAR_DIM = 97


@jax.jit
def _linearity_gap(seeds, a, b, alpha):
    cs = cz.CountSketch(seeds=seeds, dim=_LINEAR_DIM, rows=3, cols=11)
    return (jnp.abs(cz.sketch(cs, a + b) - cz.sketch(cs, a) - cz.sketch(cs, b)).max(),
            jnp.abs(cz.sketch(cs, alpha * a) - alpha * cz.sketch(cs, a)).max())


vectors = st.lists(st.floats(-100, 100, allow_nan=False, width=32), min_size=_LINEAR_DIM,
                   max_size=_LINEAR_DIM)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2 ** 16), alpha=st.floats(-3, 3, allow_nan=False), a=vectors, b=vectors)
def test_sketch_is_linear(seed, alpha, a, b):
    seeds = cz.count_sketch(jax.random.key(seed), _LINEAR_DIM, rows=3, cols=11).seeds
    add_gap, scale_gap = _linearity_gap(seeds, jnp.array(a), jnp.array(b), alpha)
    assert float(add_gap) <= 1e-3 and float(scale_gap) <= 1e-3


@pytest.mark.parametrize("dim, rows, cols", [(1, 1, 1), (5, 2, 1), (300, 4, 50)])
def test_sketch_is_linear_at_edge_shapes(dim, rows, cols):
    cs = cz.count_sketch(jax.random.key(dim), dim, rows=rows, cols=cols)
    a, b = jax.random.normal(jax.random.key(1), (2, dim))
    np.testing.assert_allclose(sketch(cs, a + b), sketch(cs, a) + sketch(cs, b), atol=1e-5)
    if cols == 1 and rows == 1:        # one cell: the signed sum
        s = cz.hashes(cs, jnp.arange(dim))[1][0]
        np.testing.assert_allclose(sketch(cs, a)[0, 0], jnp.sum(s * a), atol=1e-6)


def test_batched_sketch_equals_per_client_loop_and_sparse_sketch():
    d, C = 500, 7
    cs = cz.count_sketch(jax.random.key(2), d, rows=3, cols=31)
    vs = jax.random.normal(jax.random.key(3), (C, d))
    loop = np.stack([np.asarray(sketch(cs, vs[i])) for i in range(C)])
    np.testing.assert_allclose(sketch(cs, vs), loop, atol=1e-5)
    chunked = jax.jit(lambda cs, vs: cz.sketch_clients(cs, vs, chunk=3))(cs, vs)
    np.testing.assert_allclose(chunked, loop, atol=1e-5)
    assert sketch(cs, vs).shape == (C, 3, 31)
    idx = jnp.array([4, 99, 250, 499])
    vals = jnp.array([1.0, -2.0, 0.5, 3.0])
    dense = jnp.zeros(d).at[idx].set(vals)
    np.testing.assert_allclose(cz.sketch_sparse(cs, idx, vals), sketch(cs, dense), atol=1e-6)


def test_hashes_are_uniform_and_signs_balanced():
    d, c = 200_000, 100
    cs = cz.count_sketch(jax.random.key(0), d, rows=2, cols=c)
    b, s = cz.hashes(cs, jnp.arange(d))
    counts = np.stack([np.bincount(np.asarray(b[j]), minlength=c) for j in range(2)])
    chi2 = np.sum((counts - d / c) ** 2 / (d / c), axis=1)
    assert np.all(chi2 < 160)                       # chi^2 with 99 dof: p ~ 1e-4 at 160
    assert np.all(np.abs(np.asarray(s).mean(axis=1)) < 0.01)
    assert np.mean(np.asarray(b[0]) == np.asarray(b[1])) < 2.0 / c   # rows are independent


# ---------------------------------------------------------------------------- sparsify/quantize
def test_top_k_and_error_feedback():
    v = jnp.array([0.1, -5.0, 3.0, 0.0, -0.2, 4.0])
    msg = cz.top_k(v, 3)
    assert set(np.asarray(msg.idx).tolist()) == {1, 2, 5}
    np.testing.assert_allclose(cz.to_dense(msg, 6), [0, -5, 3, 0, 0, 4])
    e = jnp.array([0.0, 0.0, 0.0, 0.0, -6.0, 0.0])
    msg, new_e = cz.with_error_feedback(lambda a: cz.top_k(a, 2), v, e)
    assert set(np.asarray(msg.idx).tolist()) == {1, 4}         # the error made coordinate 4 heavy
    np.testing.assert_allclose(cz.to_dense(msg, 6) + new_e, v + e)  # nothing lost
    batched = cz.top_k(jnp.stack([v, -v]), 2)
    assert batched.idx.shape == (2, 2)


@jax.jit
def _draws(v, keys):
    rk = jax.vmap(lambda key: cz.to_dense(cz.random_k(key, v, 10), v.shape[0]))(keys)
    q = jax.vmap(lambda key: cz.qsgd(key, v, levels=4))(keys)
    return rk, q.levels, cz.qsgd_decode(q, levels=4)


def test_random_k_is_unbiased_and_qsgd_is_unbiased_and_bounded():
    v = jax.random.normal(jax.random.key(0), (50,))
    keys = jax.random.split(jax.random.key(1), 3000)
    rk, levels, dec = _draws(v, keys)
    assert np.all(np.asarray((rk != 0).sum(1)) <= 10)
    np.testing.assert_allclose(rk.mean(0), v, atol=0.35)
    assert float(jnp.abs(rk.mean(0) - v).mean()) < 0.1
    assert int(jnp.abs(levels).max()) <= 4
    np.testing.assert_allclose(dec.mean(0), v, atol=0.08)
    assert bool(jnp.all(jnp.abs(dec) <= jnp.linalg.norm(v) + 1e-5))
    zero = cz.qsgd(keys[0], jnp.zeros(5), levels=4)
    np.testing.assert_array_equal(cz.qsgd_decode(zero, levels=4), 0.0)


def test_scaled_sign():
    v = jnp.array([1.0, -3.0, 0.0, 2.0])
    s = cz.scaled_sign(v)
    np.testing.assert_allclose(s.scale, 1.5)
    np.testing.assert_allclose(cz.scaled_sign_decode(s), [1.5, -1.5, 1.5, 1.5])


def test_bytes_on_the_wire():
    cs = cz.count_sketch(jax.random.key(0), 10 ** 6, rows=5, cols=50_000)
    assert cs.num_bytes == 5 * 50_000 * 4
    assert cz.sparse_bytes(100) == 800
    assert cz.random_k_bytes(100, shared_seed=True) == 404
    assert cz.qsgd_bytes(1000, levels=1) == 4 + 1000 * 2 // 8       # 3 values: 2 bits
    assert cz.qsgd_bytes(1000, levels=7) == 4 + 1000 * 4 // 8       # 15 values: 4 bits
    assert cz.scaled_sign_bytes(1001) == 4 + 126


def test_everything_jits_and_vmaps():
    cs = cz.count_sketch(jax.random.key(0), 64, rows=3, cols=16)
    vs = jax.random.normal(jax.random.key(1), (4, 64))
    f = jax.jit(lambda cs, vs: jax.vmap(lambda v: cz.heavy_hitters(cs, cz.sketch(cs, v), 5))(vs))
    idx, vals = f(cs, vs)
    assert idx.shape == (4, 5) and vals.shape == (4, 5)


# ------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs, match", [
    (dict(dim=0, rows=1, cols=1), "dim"),
    (dict(dim=10, rows=0, cols=1), "rows"),
    (dict(dim=10, rows=1, cols=2.5), "cols"),
])
def test_count_sketch_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cz.count_sketch(jax.random.key(0), **kwargs)


def test_bad_arguments_name_the_argument():
    cs = cz.count_sketch(jax.random.key(0), 10, rows=2, cols=4)
    with pytest.raises(ValueError, match="dim=10"):
        cz.sketch(cs, jnp.zeros(11))
    with pytest.raises(ValueError, match="num_candidates"):
        cz.heavy_hitters(cs, jnp.zeros((2, 4)), 5, num_candidates=3)
    with pytest.raises(ValueError, match="k must be <="):
        cz.top_k(jnp.zeros(3), 4)
    with pytest.raises(ValueError, match="k must be"):
        cz.random_k(jax.random.key(0), jnp.zeros(3), 0)
    with pytest.raises(ValueError, match="levels"):
        cz.qsgd(jax.random.key(0), jnp.zeros(3), levels=0)
