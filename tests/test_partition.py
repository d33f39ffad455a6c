"""Property tests: every example assigned once, sizes sum, no empty client unless asked."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fedjax_lab.data import partition

SETTINGS = settings(max_examples=40, deadline=None)


def _check(owner, n, k, allow_empty=False):
    assert owner.shape == (n,)
    assert owner.min() >= 0 and owner.max() < k
    sizes = np.bincount(owner, minlength=k)
    assert sizes.sum() == n
    if not allow_empty:
        assert sizes.min() >= 1
    return sizes


@SETTINGS
@given(n=st.integers(1, 500), k=st.integers(1, 50), seed=st.integers(0, 2**31 - 1))
def test_iid(n, k, seed):
    k = min(k, n)
    sizes = _check(partition.iid(n, k, seed=seed), n, k)
    assert sizes.max() - sizes.min() <= 1
    np.testing.assert_array_equal(partition.iid(n, k, seed=seed), partition.iid(n, k, seed=seed))


@SETTINGS
@given(n=st.integers(10, 2000), k=st.integers(1, 40), sigma=st.floats(0.1, 3.0),
       seed=st.integers(0, 1000))
def test_power_law(n, k, sigma, seed):
    k = min(k, n)
    _check(partition.power_law(n, k, sigma=sigma, seed=seed), n, k)


@SETTINGS
@given(n=st.integers(50, 600), classes=st.integers(2, 10), k=st.integers(2, 10),
       alpha=st.floats(0.05, 10.0), seed=st.integers(0, 1000))
def test_dirichlet(n, classes, k, alpha, seed):
    labels = np.random.default_rng(seed).integers(0, classes, n)
    owner = partition.dirichlet(labels, k, alpha=alpha, seed=seed)
    _check(owner, n, k, allow_empty=True)


def test_dirichlet_min_size_and_skew():
    labels = np.repeat(np.arange(10), 100)
    owner = partition.dirichlet(labels, 20, alpha=0.1, seed=0, min_size=5)
    _check(owner, 1000, 20)
    # small alpha: most clients are dominated by few classes
    counts = np.stack([np.bincount(labels[owner == c], minlength=10) for c in range(20)])
    top2 = np.sort(counts, 1)[:, -2:].sum(1) / counts.sum(1)
    assert np.median(top2) > 0.8
    iid_like = partition.dirichlet(labels, 20, alpha=100.0, seed=0)
    counts = np.stack([np.bincount(labels[iid_like == c], minlength=10) for c in range(20)])
    assert np.median(np.sort(counts, 1)[:, -2:].sum(1) / counts.sum(1)) < 0.4


@SETTINGS
@given(classes=st.integers(2, 10), per=st.integers(5, 60), k=st.integers(1, 20),
       spc=st.integers(1, 3), seed=st.integers(0, 1000))
def test_shards(classes, per, k, spc, seed):
    labels = np.repeat(np.arange(classes), per)
    n = labels.shape[0]
    if k * spc > n:
        with pytest.raises(ValueError, match="shards_per_client"):
            partition.shards(labels, k, shards_per_client=spc, seed=seed)
        return
    owner = partition.shards(labels, k, shards_per_client=spc, seed=seed)
    _check(owner, n, k)


def test_shards_give_few_labels_per_client():
    labels = np.repeat(np.arange(10), 60)
    owner = partition.shards(labels, 30, shards_per_client=2, seed=0)
    distinct = [len(np.unique(labels[owner == c])) for c in range(30)]
    assert max(distinct) <= 4 and np.mean(distinct) <= 2.5


@pytest.mark.parametrize("call, match", [
    (lambda: partition.iid(10, 0), "num_clients"),
    (lambda: partition.dirichlet(np.zeros(10), 2, alpha=0.0), "alpha"),
    (lambda: partition.power_law(10, 5, min_size=3), "min_size"),
    (lambda: partition.shards(np.zeros(10), 6, shards_per_client=2), "shards_per_client"),
])
def test_bad_partition_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@SETTINGS
@given(ways=st.integers(1, 6), shots=st.integers(1, 8), stdev=st.integers(0, 3),
       k=st.integers(1, 12), seed=st.integers(0, 1000))
def test_nway_kshot(ways, shots, stdev, k, seed):
    classes = 6
    labels = np.repeat(np.arange(classes), 120)
    np.random.default_rng(seed).shuffle(labels)
    owner = partition.nway_kshot(labels, k, ways=ways, shots=shots, stdev=stdev, seed=seed)
    assert owner.shape == labels.shape and owner.min() >= -1 and owner.max() < k
    lo_n, hi_n = max(2, ways - stdev), min(classes, ways + stdev)
    lo_n = min(lo_n, hi_n)
    for i in range(k):
        counts = np.bincount(labels[owner == i], minlength=classes)
        held = counts[counts > 0]
        assert lo_n <= held.size <= hi_n                       # n_i classes
        assert np.all(held == held[0])                         # k_i examples of each
        assert max(1, shots - stdev) <= held[0] <= shots + stdev
    np.testing.assert_array_equal(
        owner, partition.nway_kshot(labels, k, ways=ways, shots=shots, stdev=stdev, seed=seed))


def test_nway_kshot_spread_and_errors():
    labels = np.repeat(np.arange(10), 1000)
    owner = partition.nway_kshot(labels, 80, ways=3, shots=20, stdev=2, seed=0)
    n_i = np.array([np.unique(labels[owner == i]).size for i in range(80)])
    k_i = np.array([np.bincount(labels[owner == i]).max() for i in range(80)])
    assert set(n_i) == {2, 3, 4, 5} and set(k_i) == set(range(18, 23))   # both ends reached
    assert (owner == -1).sum() == 10000 - sum(n_i * k_i)                  # the rest: nobody's
    with pytest.raises(ValueError, match="class .* ran out of examples.*lower shots=100"):
        partition.nway_kshot(labels, 80, ways=3, shots=100, stdev=2, seed=0)
    with pytest.raises(ValueError, match="ways=11 exceeds the 10 classes"):
        partition.nway_kshot(labels, 5, ways=11, shots=2)
    with pytest.raises(ValueError, match="shots must be an integer >= 1"):
        partition.nway_kshot(labels, 5, ways=3, shots=0)
