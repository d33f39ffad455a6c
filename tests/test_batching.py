"""On-device batch drawing: own rows only, epoch-style without repeats, masks, independence."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fedjax_lab.core.batching import draw_batches
from fedjax_lab import Cohort, LocalWork
from fedjax_lab.core.rounds import participate
from fedjax_lab.data import federated_arrays


@pytest.fixture(scope="module")
def data():
    sizes = np.array([3, 40, 7, 25, 1, 12])
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    return federated_arrays(np.arange(offsets[-1], dtype=np.float32)[:, None],
                            np.zeros(offsets[-1], int), offsets)


@pytest.mark.parametrize("shuffle", ["epoch", "replacement"])
def test_indices_stay_inside_each_client(data, shuffle):
    ids = jnp.array([0, 1, 2, 3, 4, 5])
    b = draw_batches(jax.random.key(0), data, ids, batch_size=4, local_steps=9, shuffle=shuffle)
    assert b.idx.shape == (6, 9, 4) and b.step_mask.shape == (6, 9)
    off = np.asarray(data.offsets)
    for c in range(6):
        rows = np.asarray(b.idx[c])
        assert rows.min() >= off[c] and rows.max() < off[c + 1]


def test_epoch_shuffle_has_no_repeats_within_a_pass(data):
    ids = jnp.array([1, 3, 2])
    b = draw_batches(jax.random.key(1), data, ids, batch_size=5, local_steps=16, shuffle="epoch")
    for c, cid in enumerate([1, 3, 2]):
        n = int(data.client_sizes[cid])
        stream = np.asarray(b.idx[c]).ravel()
        for e in range(len(stream) // n):
            np.testing.assert_array_equal(np.sort(stream[e * n:(e + 1) * n]),
                                          np.arange(n) + int(data.offsets[cid]))
        assert not np.array_equal(stream[:n], stream[n:2 * n])   # a fresh permutation per pass


def test_epochs_mode_masks_by_client_size(data):
    ids = jnp.array([0, 1, 4])
    b = draw_batches(jax.random.key(2), data, ids, batch_size=4, epochs=2, shuffle="epoch")
    assert b.idx.shape[1] == 20                     # ceil(2 * 40 / 4) for the largest client
    np.testing.assert_array_equal(b.num_steps, [2, 20, 1])      # ceil(2 n / 4)
    np.testing.assert_array_equal(np.asarray(b.step_mask).sum(1), [2, 20, 1])
    stream = np.asarray(b.idx[1]).ravel()          # two exact passes over client 1's 40 rows
    off = int(data.offsets[1])
    for e in range(2):
        np.testing.assert_array_equal(np.sort(stream[e * 40:(e + 1) * 40]), np.arange(40) + off)


def test_batches_depend_only_on_key_and_client(data):
    k = jax.random.key(3)
    a = draw_batches(k, data, jnp.array([2, 5]), batch_size=3, local_steps=4)
    b = draw_batches(k, data, jnp.array([5, 0, 2]), batch_size=3, local_steps=4)
    np.testing.assert_array_equal(a.idx[0], b.idx[2])
    np.testing.assert_array_equal(a.idx[1], b.idx[0])


def test_stragglers_mask_work_in_range(data):
    work = LocalWork(batch_size=2, local_steps=10, stragglers=0.5)
    part = participate(jax.random.key(4), data, Cohort(clients_per_round=6), work)
    steps = np.asarray(part.batches.num_steps)
    strag = np.asarray(part.is_straggler)
    assert strag.sum() == 3
    assert np.all(steps[~strag] == 10)
    assert np.all((steps[strag] >= 1) & (steps[strag] < 10))
    np.testing.assert_array_equal(np.asarray(part.batches.step_mask).sum(1), steps)


def test_epoch_stragglers_do_fewer_epochs(data):
    work = LocalWork(batch_size=2, epochs=5, stragglers=1.0)
    part = participate(jax.random.key(5), data, Cohort(clients_per_round=6), work)
    n = np.asarray(part.num_examples)
    steps = np.asarray(part.batches.num_steps)
    full = np.ceil(5 * n / 2)
    assert np.all(steps <= full)
    assert np.all(steps >= np.ceil(n / 2))            # at least one epoch
    assert np.any(steps < full)


def _many(data, ids, rounds, seed, **kw):
    fn = jax.jit(jax.vmap(lambda k: draw_batches(k, data, jnp.asarray(ids), **kw)))
    return fn(jax.random.split(jax.random.key(seed), rounds))


def _chi2_uniform_p(counts):
    counts = np.asarray(counts, float).ravel()
    return stats.chisquare(counts).pvalue


def test_epoch_passes_are_uniform_independent_permutations(data):
    """Client 0 (n = 3), two passes of B = 3: over 12,000 keys each pass is one of the 3! orders
    with probability 1/6 and the pair of passes one of 36 with probability 1/36 (independent
    passes); chi-square p > 1e-3. Every pass uses each example exactly once."""
    b = _many(data, [0], 12_000, 10, batch_size=3, local_steps=2, shuffle="epoch")
    passes = np.asarray(b.idx)[:, 0] - int(data.offsets[0])        # [R, 2 passes, 3]
    np.testing.assert_array_equal(np.sort(passes, -1), np.broadcast_to(np.arange(3), passes.shape))
    code = {p: i for i, p in enumerate(itertools.permutations(range(3)))}
    first = np.array([code[tuple(r)] for r in passes[:, 0]])
    second = np.array([code[tuple(r)] for r in passes[:, 1]])
    assert _chi2_uniform_p(np.bincount(first, minlength=6)) > 1e-3
    assert _chi2_uniform_p(np.bincount(first * 6 + second, minlength=36)) > 1e-3


def test_epochs_mode_uses_each_example_once_per_epoch(data):
    """E = 3 epochs, B = 4: for every client and key, stream positions e n ... (e + 1) n - 1 hold
    each of the client's examples once (the top-up of the last batch wraps to the start), and the
    position of an example within a pass is uniform (chi-square p > 1e-3, client 2, n = 7)."""
    ids = [0, 1, 2, 3, 4, 5]
    b = _many(data, ids, 2_000, 11, batch_size=4, epochs=3, shuffle="epoch")
    idx, steps = np.asarray(b.idx), np.asarray(b.num_steps)
    sizes = np.asarray(data.client_sizes)
    off = np.asarray(data.offsets)
    for c, n in enumerate(sizes):
        assert np.all(steps[:, c] == int(np.ceil(3 * n / 4)))
        stream = idx[:, c].reshape(idx.shape[0], -1)[:, :3 * n].reshape(-1, 3, n) - off[c]
        np.testing.assert_array_equal(np.sort(stream, -1), np.broadcast_to(np.arange(n),
                                                                           stream.shape))
    where = idx[:, 2].reshape(idx.shape[0], -1)[:, :7] - off[2]     # first pass of client 2
    first_at = np.argmax(where == 0, axis=1)                        # position of its example 0
    assert _chi2_uniform_p(np.bincount(first_at, minlength=7)) > 1e-3


def test_replacement_draws_are_iid_uniform_over_the_client(data):
    """shuffle="replacement": every position is uniform over the client's n = 7 examples and two
    positions are independent (49 cells), chi-square p > 1e-3."""
    b = _many(data, [2], 6_000, 12, batch_size=2, local_steps=1, shuffle="replacement")
    pos = np.asarray(b.idx)[:, 0, 0] - int(data.offsets[2])
    assert pos.min() >= 0 and pos.max() < 7
    assert _chi2_uniform_p(np.bincount(pos[:, 0], minlength=7)) > 1e-3
    assert _chi2_uniform_p(np.bincount(pos[:, 0] * 7 + pos[:, 1], minlength=49)) > 1e-3


def test_shuffle_auto_falls_back_to_replacement_for_huge_permutations():
    from fedjax_lab.core.batching import resolve_shuffle
    sizes = np.array([1, 100_000])
    d = federated_arrays(np.zeros((sizes.sum(), 1), np.float32), np.zeros(sizes.sum(), int),
                         np.concatenate([[0], np.cumsum(sizes)]))
    assert resolve_shuffle("auto", d, 2, 20, 10, None) == "replacement"
    assert resolve_shuffle("auto", d, 2, 20, 10, 1) == "epoch"
    with pytest.raises(ValueError, match="shuffle"):
        resolve_shuffle("sometimes", d, 2, 20, 10, None)
