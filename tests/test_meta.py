"""The meta-learning evaluation protocol (core/meta.py): support/query split, client roles,
client selection and adapted evaluation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lab import models
from fedjax_lab.core import meta
from fedjax_lab.data import from_client_lists

SIZES = [2, 3, 7, 10, 25]


def _data(sizes=SIZES, test_sizes=None):
    """x[:, 0] is the example's global id, so every row can be told apart; 3 classes."""
    rng = np.random.default_rng(1)
    total = sum(sizes)
    ids = np.arange(total, dtype=np.float32)
    x = np.stack([ids, rng.normal(size=total).astype(np.float32)], axis=1)
    y = rng.integers(0, 3, total)
    cuts = np.cumsum([0] + list(sizes))
    test_sizes = test_sizes or [2] * len(sizes)
    txs = [rng.normal(size=(n, 2)).astype(np.float32) for n in test_sizes]
    tys = [rng.integers(0, 3, n) for n in test_sizes]
    return from_client_lists([x[a:b] for a, b in zip(cuts[:-1], cuts[1:])],
                             [y[a:b] for a, b in zip(cuts[:-1], cuts[1:])],
                             test_xs=txs, test_ys=tys, num_classes=3)


def _client_ids(split, k):
    x, _ = split.client(k)
    return np.asarray(x)[:, 0].astype(int)


# --- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("f", [0.0, 1.0, -0.2, 1.5, float("nan"), "0.2", True])
def test_support_fraction_outside_open_interval(f):
    with pytest.raises(ValueError, match=r"support_fraction must lie in \(0, 1\)"):
        meta.split_support_query(_data(), support_fraction=f)


def test_client_too_small_to_split_is_named():
    with pytest.raises(ValueError, match=r"support_fraction=0.2: data client 1 has 1 example"):
        meta.split_support_query(_data([4, 1, 5]), support_fraction=0.2)


def test_client_roles_bad_input():
    for bad in [(0.5, 0.5), (0.8, 0.1, 0.2), (0.9, -0.1, 0.2), (0.0, 0.5, 0.5), "0.8"]:
        with pytest.raises(ValueError, match="fractions must be three non-negative"):
            meta.client_roles(10, bad)
    with pytest.raises(ValueError, match="num_clients=2 is too few"):
        meta.client_roles(2, (0.8, 0.1, 0.1))
    with pytest.raises(ValueError, match="num_clients must be > 0"):
        meta.client_roles(0)


def test_select_clients_bad_ids():
    d = _data()
    with pytest.raises(ValueError, match=r"ids must lie in \[0, num_clients=5\)"):
        meta.select_clients(d, [0, 5])
    with pytest.raises(ValueError, match="ids must be a non-empty 1-D array"):
        meta.select_clients(d, [])


def test_adapted_evaluation_bad_input():
    d = _data()
    model = models.logistic(3)
    s, q = meta.split_support_query(d)
    with pytest.raises(ValueError, match="same clients"):
        meta.adapted_evaluation(model, meta.no_adapt(), None, s, meta.select_clients(d, [0]).test)
    with pytest.raises(ValueError, match="steps must be > 0"):
        meta.gd_adapt(model, 0.1, steps=0)


# --- the split ---------------------------------------------------------------------------------

@pytest.mark.parametrize("f", [0.2, 0.5, 0.9])
def test_each_client_splits_into_support_and_query(f):
    d = _data()
    s, q = meta.split_support_query(d, support_fraction=f, seed=3)
    assert s.num_clients == q.num_clients == d.num_clients
    assert s.test is None and q.test is None
    for k, n in enumerate(SIZES):
        n_s = int(np.clip(np.floor(np.float32(f) * np.float32(n) + np.float32(0.5)), 1, n - 1))
        sup, qry, own = _client_ids(s, k), _client_ids(q, k), _client_ids(d, k)
        assert len(sup) == n_s and len(qry) == n - n_s and len(qry) >= 1 and len(sup) >= 1
        assert not set(sup) & set(qry)
        assert sorted(np.concatenate([sup, qry])) == sorted(own)
        # labels travel with their examples
        x_s, y_s = s.client(k)
        lookup = dict(zip(np.asarray(d.x)[:, 0].astype(int), np.asarray(d.y)))
        assert [lookup[i] for i in sup] == np.asarray(y_s).tolist()


def test_split_is_deterministic_and_seeded():
    d = _data()
    a, _ = meta.split_support_query(d, 0.5, seed=0)
    b, _ = meta.split_support_query(d, 0.5, seed=0)
    c, _ = meta.split_support_query(d, 0.5, seed=1)
    np.testing.assert_array_equal(np.asarray(a.x), np.asarray(b.x))
    assert not np.array_equal(np.asarray(a.x), np.asarray(c.x))
    # client k's split depends on (seed, k) only: appending clients leaves it unchanged
    more, _ = meta.split_support_query(_data(SIZES + [6, 9], [2] * 7), 0.5, seed=0)
    for k in range(len(SIZES)):
        np.testing.assert_array_equal(_client_ids(a, k), _client_ids(more, k))


def test_device_rows_match_the_materialized_split():
    d = _data()
    s, q = meta.split_support_query(d, 0.3, seed=2)
    ids = jnp.array([4, 0, 2])
    s_rows, q_rows = jax.jit(meta.support_query_rows, static_argnums=(2, 3))(d, ids, 0.3, 2)
    gid = np.asarray(d.x)[:, 0].astype(int)
    for i, k in enumerate([4, 0, 2]):
        r = np.asarray(s_rows[i]); r = r[r >= 0]
        np.testing.assert_array_equal(gid[r], _client_ids(s, k))
        r = np.asarray(q_rows[i]); r = r[r >= 0]
        np.testing.assert_array_equal(gid[r], _client_ids(q, k))


# --- roles and selection -----------------------------------------------------------------------

def test_client_roles_partition_the_clients():
    tr, va, te = meta.client_roles(20, seed=4)
    assert (len(tr), len(va), len(te)) == (16, 2, 2)
    assert sorted(np.concatenate([tr, va, te]).tolist()) == list(range(20))
    again = meta.client_roles(20, seed=4)
    for a, b in zip((tr, va, te), again):
        np.testing.assert_array_equal(a, b)
    assert not all(np.array_equal(a, b) for a, b in zip((tr, va, te), meta.client_roles(20, seed=5)))
    tr, va, te = meta.client_roles(5, (0.8, 0.0, 0.2))
    assert (len(tr), len(va), len(te)) == (4, 0, 1)


def test_select_clients_keeps_train_and_test_rows():
    d = _data()
    sub = meta.select_clients(d, [3, 0])
    assert sub.num_clients == 2 and sub.test.num_clients == 2
    for new, old in enumerate([3, 0]):
        for split_new, split_old in ((sub, d), (sub.test, d.test)):
            xn, yn = split_new.client(new)
            xo, yo = split_old.client(old)
            np.testing.assert_array_equal(np.asarray(xn), np.asarray(xo))
            np.testing.assert_array_equal(np.asarray(yn), np.asarray(yo))
    assert sub.num_classes == d.num_classes


# --- adaptation and evaluation -----------------------------------------------------------------

def _params(model, d, seed=0):
    return model.init(jax.random.key(seed), d.x[:1])


def _reference_eval(model, per_client_params, target):
    """Per-client accuracies and counts, one client at a time, unjitted."""
    acc, n = [], []
    for k in range(target.num_clients):
        x, y = target.client(k)
        if x.shape[0] == 0:
            continue
        p = jax.tree.map(lambda v: v[k], per_client_params)
        pred = np.argmax(np.asarray(model.apply(p, x, train=False, rng=None)), -1)
        acc.append(np.mean(pred == np.asarray(y)))
        n.append(x.shape[0])
    return np.array(acc), np.array(n)


def test_gd_adapt_and_evaluation_match_a_per_client_loop():
    d = _data()
    model = models.logistic(3)
    params = _params(model, d)
    s, q = meta.split_support_query(d, 0.5, seed=0)
    adapt = meta.gd_adapt(model, 0.7, steps=2)
    got = jax.jit(adapt)(params, s, jnp.arange(5))
    ref = []
    for k in range(5):      # numpy: W <- W - lr X^T (softmax(XW + b) - Y) / n on the support, twice
        x, y = (np.asarray(v, np.float64) for v in s.client(k))
        W = np.asarray(params["Dense_0"]["kernel"], np.float64)
        b = np.asarray(params["Dense_0"]["bias"], np.float64)
        Y = np.eye(3)[y.astype(int)]
        for _ in range(2):
            z = x @ W + b
            P = np.exp(z - z.max(1, keepdims=True))
            P /= P.sum(1, keepdims=True)
            W, b = W - 0.7 * x.T @ (P - Y) / len(y), b - 0.7 * (P - Y).mean(0)
        ref.append({"Dense_0": {"bias": b, "kernel": W}})
    ref = jax.tree.map(lambda *v: jnp.stack(v), *ref)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), got, ref)

    m = meta.adapted_evaluation(model, adapt, params, s, q, prefix="ad", clients_per_chunk=2)
    acc, n = _reference_eval(model, ref, q)
    np.testing.assert_allclose(m["ad_accuracy"], np.sum(acc * n) / n.sum(), rtol=1e-6)
    np.testing.assert_allclose(m["ad_accuracy_client_mean"], acc.mean(), rtol=1e-6)
    for p in (10, 50, 90):
        np.testing.assert_allclose(m[f"ad_accuracy_p{p}"], np.percentile(acc, p), rtol=1e-6)


def test_adaptation_sees_only_the_support_split():
    d = _data()
    model = models.logistic(3)
    params = _params(model, d)
    s, q = meta.split_support_query(d, 0.5, seed=0)
    seen = []

    def spy(state, support, ids):
        seen.append(support)
        return meta.gd_adapt(model, 0.5)(state, support, ids)

    m = meta.adapted_evaluation(model, spy, params, s, d.test, prefix="t")
    assert len(seen) == 1 and seen[0].x.shape == s.x.shape
    # corrupting the query and the test labels changes the evaluation, never the adapted models
    bad_test = d.test.replace(y=(d.test.y + 1) % 3)
    m_bad = meta.adapted_evaluation(model, spy, params, s, bad_test, prefix="t")
    assert m_bad["t_accuracy"] != m["t_accuracy"]
    adapt = jax.jit(meta.gd_adapt(model, 0.5))
    a = adapt(params, s, jnp.arange(5))
    b = adapt(params, s, jnp.arange(5))      # same support, any query -> same models
    jax.tree.map(np.testing.assert_array_equal, a, b)
    shifted = s.replace(y=(s.y + 1) % 3)
    c = adapt(params, shifted, jnp.arange(5))
    assert not np.allclose(jax.tree.leaves(a)[0], jax.tree.leaves(c)[0])


def test_no_adapt_equals_the_global_model_and_finetune_fits_the_support():
    d = _data()
    model = models.logistic(3)
    params = _params(model, d)
    s, q = meta.split_support_query(d, 0.5, seed=0)
    m0 = meta.adapted_evaluation(model, meta.no_adapt(), params, s, d.test, prefix="g")
    acc, n = _reference_eval(model, jax.tree.map(lambda v: jnp.stack([v] * 5), params), d.test)
    np.testing.assert_allclose(m0["g_accuracy"], np.sum(acc * n) / n.sum(), rtol=1e-6)
    ft = meta.finetune(model, "sgd", steps=30, batch_size=4)
    before = meta.adapted_evaluation(model, meta.no_adapt(), params, s, s, prefix="s")
    after = meta.adapted_evaluation(model, ft, params, s, s, prefix="s")
    assert after["s_loss"] < before["s_loss"]


def test_driver_reports_the_adapted_accuracy_on_each_clients_test_split():
    """fl.run scores FedMeta / Per-FedAvg after adaptation on the support (or train) split only."""
    import fedjax_lab as fl
    from fedjax_lab import algorithms, models
    from fedjax_lab.core import meta
    data = fl.data.load("digits:shards=2,clients=12", seed=0)
    model = models.logistic(data.num_classes)
    for alg in (algorithms.fedmeta_fomaml(model, setup=fl.Setup.of(clients_per_round=4)),
                algorithms.perfedavg_fo(model, setup=fl.Setup.of(clients_per_round=4,
                                                                 local_steps=2))):
        result = fl.run(alg, data, rounds=2, key=0, eval_every=2, progress=False)
        got = result.history[-1]["test_adapted_accuracy"]
        want = meta.adapted_evaluation(model, alg.adapt, result.state, alg.adapt_split(data),
                                       data.test, prefix="x")["x_accuracy"]
        assert abs(got - want) < 1e-6, (alg.name, got, want)
        assert got != result.history[-1]["test_accuracy"]       # adaptation changed something
