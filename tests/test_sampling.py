"""Client sampling and straggler assignment, checked by their distributions over many keys.

Reference distributions are written out here (uniform subsets, i.i.d. draws with p_k = n_k / n,
successive draws among those left, uniform straggler sets and work); the code under test only
produces the samples. Every statistical check is either a chi-square goodness-of-fit test with
p-value > 1e-3 or a stated tolerance of 5 standard errors, at fixed seeds.
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fedjax_lab import Cohort, LocalWork, Setup, algorithms, models
from fedjax_lab.core.rounds import participate
from fedjax_lab.core.sampling import sample_clients, straggler_steps
from fedjax_lab.data import federated_arrays

SIZES = np.array([3, 8, 17, 5, 11])        # tests/conftest.py's tiny_data sizes
P = SIZES / SIZES.sum()


def _draws(scheme, sizes, C, rounds, seed=0):
    sizes = jnp.asarray(sizes)
    fn = jax.jit(jax.vmap(lambda k: sample_clients(k, sizes.shape[0], C, client_sizes=sizes,
                                                   scheme=scheme)))
    return np.asarray(fn(jax.random.split(jax.random.key(seed), rounds)))


def _chi2_p(counts, probs):
    counts = np.asarray(counts, float).ravel()
    expected = np.asarray(probs, float).ravel() * counts.sum()
    return stats.chisquare(counts, expected).pvalue


# ---------------------------------------------------------------- the aggregate (issue item 1)

def _one_hot_clients(sizes):
    """Client k holds n_k copies of e_k: one SGD step of lr 1 on 1/2 ||x - e_k||^2 from x = 0 lands
    on e_k whatever the batch, so Delta_k = e_k and the round's aggregate *is* the vector of the
    weights the round gave each client."""
    m = len(sizes)
    return federated_arrays(np.repeat(np.eye(m, dtype=np.float32), sizes, 0),
                            np.zeros(int(np.sum(sizes)), int),
                            np.concatenate([[0], np.cumsum(sizes)]), num_classes=1)


def _mean_aggregate(sampling, rounds, C=4, seed=0):
    data = _one_hot_clients(SIZES)
    alg = algorithms.fedavg(models.quadratic(), setup=Setup.of(
        client_lr=1.0, local_steps=1, batch_size=1, clients_per_round=C, sampling=sampling,
        weighting="uniform"))
    state = alg.init(jax.random.key(0), data)
    agg = jax.jit(jax.vmap(lambda k: alg.round(state, data, k)[0].params["x"]))(
        jax.random.split(jax.random.key(seed), rounds))
    return np.asarray(agg).mean(0)


@pytest.mark.parametrize("sampling, unbiased", [("size", True), ("size_distinct", False)])
def test_size_sampling_with_a_uniform_average_is_unbiased(sampling, unbiased):
    """E[(1/C) sum_j Delta_{k_j}] = sum_k p_k Delta_k for C = 4 > 1 (FedProx, Algorithm 2).

    Tolerance: 5 standard errors of a with-replacement round, sqrt(p_k (1 - p_k) / (C R)) ~ 0.002
    at R = 20,000. Distinct clients (Gumbel top-k) give the largest client 0.243 instead of 0.386,
    ~80 standard errors off, so the check can fail."""
    R, C = 20_000, 4
    got = _mean_aggregate(sampling, R, C)
    z = np.abs(got - P) / np.sqrt(P * (1 - P) / (C * R))
    assert np.all(z < 5) == unbiased, (sampling, got, P, z)
    if not unbiased:
        assert z.max() > 20


def test_size_sampling_draws_independently_with_replacement():
    """Every position is p_k, positions are independent (the joint of two positions is
    p_i p_j), and repeats happen as often as that implies; empty clients are never drawn."""
    sizes = np.array([3, 0, 8, 17, 5, 11])
    p = sizes / sizes.sum()
    ids = _draws("size", sizes, 4, 40_000, seed=1)
    assert ids.min() >= 0 and ids.max() < len(sizes)
    counts = np.bincount(ids.ravel(), minlength=len(sizes))
    assert counts[1] == 0
    keep = sizes > 0
    assert _chi2_p(counts[keep], p[keep]) > 1e-3
    joint = np.zeros((6, 6))
    np.add.at(joint, (ids[:, 0], ids[:, 1]), 1)
    assert _chi2_p(joint[np.ix_(keep, keep)], np.outer(p[keep], p[keep])) > 1e-3
    # P(all 4 draws distinct) = 4! * e_4(p) for i.i.d. draws
    p_distinct = 24 * sum(np.prod(c) for c in itertools.combinations(p[keep], 4))
    frac = np.mean([len(set(r)) == 4 for r in ids])
    assert abs(frac - p_distinct) < 5 * np.sqrt(p_distinct * (1 - p_distinct) / len(ids))


def test_size_sampling_power_law_largest_client_gets_its_share():
    """N = 30 power-law sizes, C = 10: the largest client carries n_max / n of the draws (Gumbel
    top-k caps it at 1/C of them)."""
    rng = np.random.default_rng(0)
    sizes = np.sort((rng.pareto(1.0, 30) + 1) * 10).astype(int)
    p = sizes / sizes.sum()
    assert p[-1] > 0.3
    ids = _draws("size", sizes, 10, 20_000, seed=2)
    assert _chi2_p(np.bincount(ids.ravel(), minlength=30), p) > 1e-3
    share = np.mean(ids == 29)
    assert abs(share - p[-1]) < 5 * np.sqrt(p[-1] * (1 - p[-1]) / ids.size)
    assert np.mean(_draws("size_distinct", sizes, 10, 2_000) == 29) <= 0.1


def test_uniform_sampling_draws_every_subset_equally_often():
    """C = 3 of N = 6 distinct clients, each of the 20 subsets with probability 1/20 (hence each
    client with C/N)."""
    N, C, R = 6, 3, 30_000
    ids = _draws("uniform", np.ones(N, int), C, R, seed=3)
    assert all(len(set(r)) == C for r in ids)
    subsets = {s: i for i, s in enumerate(itertools.combinations(range(N), C))}
    counts = np.bincount([subsets[tuple(sorted(r))] for r in ids], minlength=len(subsets))
    assert _chi2_p(counts, np.full(len(subsets), 1 / len(subsets))) > 1e-3
    incl = np.bincount(ids.ravel(), minlength=N) / R
    np.testing.assert_allclose(incl, C / N, atol=5 * np.sqrt(C / N * (1 - C / N) / R))


def test_uniform_sampling_ignores_sizes_and_stays_as_before():
    """Same key, same ids: the uniform draw is the C smallest of N uniform keys (the
    implementation before with-replacement size sampling existed), independent of sizes."""
    key = jax.random.key(7)
    want = np.argsort(np.asarray(jax.random.uniform(key, (9,))))[:4]
    got = sample_clients(key, 9, 4, client_sizes=jnp.arange(1, 10), scheme="uniform")
    np.testing.assert_array_equal(np.asarray(got), want)


def _successive_inclusion(p, C):
    """P(client k among C successive draws proportional to p among those left), enumerated."""
    incl = np.zeros(len(p))
    for seq in itertools.permutations(range(len(p)), C):
        prob, left = 1.0, 1.0
        for k in seq:
            prob *= p[k] / left
            left -= p[k]
        incl[list(seq)] += prob
    return incl


def test_size_distinct_is_successive_draws_among_those_left():
    """numpy's choice(replace=False, p=p_k) in distribution, and not proportional to p_k."""
    C, R = 3, 20_000
    ids = _draws("size_distinct", SIZES, C, R, seed=4)
    assert all(len(set(r)) == C for r in ids)
    want = _successive_inclusion(P, C)
    got = np.bincount(ids.ravel(), minlength=5) / R
    np.testing.assert_allclose(got, want, atol=5 * np.sqrt(want * (1 - want) / R).max())
    assert np.abs(want / C - P).max() > 0.05


# ------------------------------------------------------- repeated clients (with replacement)

@pytest.fixture(scope="module")
def data():
    return _one_hot_clients(SIZES)


def test_a_client_drawn_twice_does_the_same_work_twice(data):
    """Copies of a client share batches, straggler status and steps (one device, drawn twice);
    the straggler fraction per position stays round(f C) / C in expectation."""
    cohort = Cohort(clients_per_round=4, sampling="size")
    work = LocalWork(batch_size=2, local_steps=6, stragglers=0.5)
    R = 4000
    part = jax.jit(jax.vmap(lambda k: participate(k, data, cohort, work)))(
        jax.random.split(jax.random.key(5), R))
    ids, strag = np.asarray(part.ids), np.asarray(part.is_straggler)
    steps, idx = np.asarray(part.batches.num_steps), np.asarray(part.batches.idx)
    pairs = 0
    for a, b in itertools.combinations(range(4), 2):
        same = ids[:, a] == ids[:, b]
        pairs += same.sum()
        np.testing.assert_array_equal(strag[same, a], strag[same, b])
        np.testing.assert_array_equal(steps[same, a], steps[same, b])
        np.testing.assert_array_equal(idx[same, a], idx[same, b])
    assert pairs > 1000
    assert abs(strag.mean() - 0.5) < 5 * np.sqrt(0.25 / R)


# --------------------------------------------------------------------- stragglers (item 12)

@pytest.mark.parametrize("work, E, support", [("code", 6, range(1, 6)), ("paper", 6, range(1, 7)),
                                              ("code", 1, [1]), ("paper", 1, [1])])
def test_straggler_count_and_work_distribution(work, E, support):
    """Exactly round(f C) stragglers, a uniform set of positions, work uniform on `support`:
    [1, E) for the official code (default), [1, E] for the paper."""
    C, f, R = 8, 0.4, 20_000
    m = int(round(f * C))
    full = jnp.full(C, E, jnp.int32)
    fn = jax.jit(jax.vmap(lambda k: straggler_steps(k, full, f, unit_steps=jnp.ones(C),
                                                    units=E, work=work)))
    steps, strag = (np.asarray(a) for a in fn(jax.random.split(jax.random.key(6), R)))
    assert np.all(strag.sum(1) == m)
    assert np.all(steps[~strag] == E)
    assert _chi2_p(strag.sum(0), np.full(C, 1 / C)) > 1e-3
    k = steps[strag]
    assert set(np.unique(k)) == set(support)
    if len(support) > 1:
        assert _chi2_p(np.bincount(k)[list(support)], np.full(len(support), 1 / len(support))) > 1e-3


def test_straggler_work_reaches_participate_in_epochs_mode(data):
    """LocalWork(straggler_work="paper") lets a straggler do all E epochs (the default "code"
    never does: tests/test_batching.py); the default is the code's reading."""
    work = LocalWork(batch_size=2, epochs=3, stragglers=1.0, straggler_work="paper")
    part = jax.jit(jax.vmap(lambda k: participate(k, data, Cohort(clients_per_round=5), work)))(
        jax.random.split(jax.random.key(8), 200))
    steps = np.asarray(part.batches.num_steps)
    full = np.ceil(3 * SIZES / 2)[np.asarray(part.ids)]
    assert np.all(np.asarray(part.is_straggler))
    assert np.any(steps == full) and np.all(steps <= full)
    assert LocalWork().straggler_work == "code"


def test_bad_straggler_work_names_the_argument():
    # (a bad Cohort.sampling is tests/test_setup.py's)
    with pytest.raises(ValueError, match="straggler_work"):
        LocalWork(straggler_work="both")
