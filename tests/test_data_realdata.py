"""Offline real data (digits, MNIST-1D) and `federate` / `partition_like`."""
import random

import numpy as np
import pytest

from fedjax_lab.data import realdata
from fedjax_lab.data.stats import describe, label_counts


def _rows(x):
    """Multiset of rows as a sorted 2-D array (to compare example sets regardless of order)."""
    flat = np.asarray(x).reshape(len(x), -1)
    return flat[np.lexsort(flat.T[::-1])]


def _client_label_dists(data):
    c = label_counts(data).astype(float)
    return c / np.maximum(c.sum(1, keepdims=True), 1)


def test_digits_shapes_range_and_every_example_once():
    d = realdata.digits(num_clients=20, partition="dirichlet=0.3", seed=0)
    assert d.num_clients == 20 and d.num_classes == 10
    assert d.x.shape[1:] == (8, 8, 1) and d.num_examples + d.test.num_examples == 1797
    assert float(d.x.min()) == 0.0 and float(d.x.max()) == 1.0
    # holdout: train + test of all clients is exactly the 1,797 images, each once
    from sklearn.datasets import load_digits
    ref = load_digits()
    both = np.concatenate([np.asarray(d.x), np.asarray(d.test.x)]).reshape(1797, 64) * 16
    np.testing.assert_allclose(_rows(both), _rows(ref.data), atol=1e-5)
    labels = np.concatenate([np.asarray(d.y), np.asarray(d.test.y)])
    np.testing.assert_array_equal(np.bincount(labels), np.bincount(ref.target))


def test_dirichlet_and_shards_skew_labels_iid_does_not():
    iid = describe(realdata.digits(num_clients=20, partition="iid", seed=0))
    dir01 = describe(realdata.digits(num_clients=20, partition="dirichlet=0.1", seed=0))
    shards = describe(realdata.mnist1d(num_clients=50, partition="shards=2", seed=0))
    assert iid["label_tv"] < 0.2 and iid["classes_per_client"]["min"] == 10
    assert dir01["label_tv"] > 0.6
    assert shards["classes_per_client"]["max"] <= 4 and shards["label_tv"] > 0.7


def test_mnist1d_uses_its_own_test_split_with_matching_skew():
    d = realdata.mnist1d(num_clients=20, partition="dirichlet=0.3", seed=1)
    assert (d.num_examples, d.test.num_examples) == (4000, 1000) and d.x.shape[1:] == (40,)
    x, y, xt, yt = realdata._mnist1d_arrays(5000)
    np.testing.assert_array_equal(_rows(d.test.x), _rows(xt))
    p_train, p_test = _client_label_dists(d), _client_label_dists(d.test)
    has = np.asarray(d.test.client_sizes) > 0
    own = 0.5 * np.abs(p_train - p_test).sum(1)[has].mean()
    other = 0.5 * np.abs(p_train - np.roll(p_test, 1, axis=0)).sum(1)[has].mean()
    # the same client's train and test label mix agree far better than another client's
    assert own < 0.2 and other > 0.5


def test_partition_like_gives_proportional_shares_per_class():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    owner = rng.integers(0, 4, 300)
    yt = rng.integers(0, 3, 101)
    towner = realdata.partition_like(y, owner, yt, 4, seed=2)
    for c in range(3):
        share = np.bincount(owner[y == c], minlength=4) / (y == c).sum()
        got = np.bincount(towner[yt == c], minlength=4)
        assert got.sum() == (yt == c).sum()
        assert np.all(np.abs(got - share * (yt == c).sum()) <= 1.0)


def test_partition_like_spreads_unseen_classes_uniformly():
    towner = realdata.partition_like(np.zeros(10, int), np.arange(10) % 2, np.full(6, 5), 2)
    np.testing.assert_array_equal(np.bincount(towner, minlength=2), [3, 3])


def test_test_partition_without_official_split_is_stratified_holdout():
    d = realdata.digits(num_clients=10, partition="iid", test="partition", test_fraction=0.2)
    assert d.test.num_examples == pytest.approx(0.2 * 1797, abs=6)
    assert d.num_examples + d.test.num_examples == 1797


def test_mnist1d_generation_cached_and_global_rng_untouched(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDJAX_LAB_CACHE", str(tmp_path))
    random.seed(7)
    np.random.seed(7)
    before = (random.random(), np.random.rand())
    random.seed(7)
    np.random.seed(7)
    realdata._mnist1d_arrays.cache_clear()
    a = realdata.mnist1d(num_clients=5, num_samples=200)
    after = (random.random(), np.random.rand())
    assert before == after
    b = realdata.mnist1d(num_clients=5, num_samples=200)
    assert realdata._mnist1d_arrays.cache_info().hits >= 1
    np.testing.assert_array_equal(np.asarray(a.x), np.asarray(b.x))
    # a new process reads the disk copy: the same arrays
    assert len(list(tmp_path.glob("mnist1d-*-200.npz"))) == 1
    realdata._mnist1d_arrays.cache_clear()
    c = realdata.mnist1d(num_clients=5, num_samples=200)
    np.testing.assert_array_equal(np.asarray(a.x), np.asarray(c.x))
    np.testing.assert_array_equal(np.asarray(a.test.y), np.asarray(c.test.y))


def test_digits_match_scikit_learn():
    from sklearn.datasets import load_digits
    x, y = realdata._digits_arrays()
    ref = load_digits()
    np.testing.assert_array_equal(x[..., 0] * 16, ref.images)
    np.testing.assert_array_equal(y, ref.target)


def test_same_seed_same_data_other_seed_other_partition():
    a = realdata.digits(num_clients=8, partition="dirichlet=0.5", seed=3)
    b = realdata.digits(num_clients=8, partition="dirichlet=0.5", seed=3)
    c = realdata.digits(num_clients=8, partition="dirichlet=0.5", seed=4)
    np.testing.assert_array_equal(np.asarray(a.offsets), np.asarray(b.offsets))
    np.testing.assert_array_equal(np.asarray(a.x), np.asarray(b.x))
    assert not np.array_equal(np.asarray(a.offsets), np.asarray(c.offsets))


def test_callable_partition():
    d = realdata.digits(num_clients=3, partition=lambda labels, n, seed: labels % 3)
    np.testing.assert_array_equal(np.unique(np.asarray(d.client(1)[1]) % 3), [1])


@pytest.mark.parametrize("kwargs, match", [
    (dict(partition="dirichlet=0"), "dirichlet alpha must be > 0"),
    (dict(partition="shards=1.5"), "positive integer"),
    (dict(partition="zipf"), "unknown partition 'zipf'; valid partitions"),
    (dict(partition=3), "partition must be one of"),
    (dict(num_clients=0), "num_clients must be a positive integer"),
    (dict(num_clients=5000), "num_clients=5000 exceeds"),
    (dict(test="both"), "test must be one of"),
    (dict(test_fraction=1.0), "test_fraction must lie in"),
])
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        realdata.digits(**{"num_clients": 5, **kwargs})


def test_mnist1d_num_samples_checked():
    with pytest.raises(ValueError, match="num_samples"):
        realdata.mnist1d(num_samples=10)


def test_label_skew_makes_local_models_fail_on_other_classes():
    """What non-iid partitions are for: under Dirichlet(0.1) a client's own nearest-class-mean
    model (no communication) scores far below an iid client's on the global test set."""
    def local_accuracy(data):
        xt = np.asarray(data.test.x).reshape(data.test.num_examples, -1)
        yt = np.asarray(data.test.y)
        accs = []
        for k in range(data.num_clients):
            x, y = (np.asarray(v) for v in data.client(k))
            x = x.reshape(len(x), -1)
            classes = np.unique(y)
            means = np.stack([x[y == c].mean(0) for c in classes])
            pred = classes[np.argmin(((xt[:, None] - means[None]) ** 2).sum(-1), 1)]
            accs.append((pred == yt).mean())
        return float(np.mean(accs))

    iid = local_accuracy(realdata.digits(num_clients=10, partition="iid", seed=0))
    skewed = local_accuracy(realdata.digits(num_clients=10, partition="dirichlet=0.1", seed=0))
    assert iid > 0.8 and skewed < 0.5, (iid, skewed)


@pytest.mark.slow
def test_learning_label_skew_slows_fedavg_on_real_digits():
    """McMahan et al. 2017 / Hsu et al. 2019: the same FedAvg budget reaches a lower accuracy on
    Dirichlet(0.1) clients than on iid clients of the same real data."""
    import fedjax_lab
    from fedjax_lab.algorithms import fedavg
    from fedjax_lab.models import logistic

    accs = {}
    for part in ("iid", "dirichlet=0.1"):
        data = realdata.digits(num_clients=20, partition=part, seed=0, test="partition")
        alg = fedavg(logistic(10), setup=fedjax_lab.Setup.of(client_lr=0.1, clients_per_round=5,
                                                             local_steps=20, batch_size=10))
        res = fedjax_lab.run(alg, data, rounds=10, key=0, eval_every=10, progress=False)
        accs[part] = res.history[-1]["test_accuracy"]
    assert accs["iid"] > 0.85
    assert accs["iid"] - accs["dirichlet=0.1"] > 0.05, accs
