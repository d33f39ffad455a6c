"""ClientStateStore: host rows (numpy / memmap), the prefetching store loop equals the on-device
run, store-based personalized evaluation, bad input."""
import jax
import numpy as np
import pytest

from fedjax_lab import data as D
from fedjax_lab import Setup, models, run
from fedjax_lab.algorithms.ditto import ditto
from fedjax_lab.algorithms.fedavg import fedavg
from fedjax_lab.core import driver
from fedjax_lab.core.store import (ClientStateStore, run_with_store, store_for,
                                   store_personal_sums)


@pytest.mark.parametrize("on_disk", [False, True])
def test_gather_scatter_roundtrip(tmp_path, on_disk):
    row = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.float32(7.0)}
    store = ClientStateStore(row, 5, path=str(tmp_path / "rows") if on_disk else None)
    assert store.nbytes == 5 * (6 + 1) * 4
    got = store.gather([4, 0])
    np.testing.assert_array_equal(got["w"], np.stack([row["w"]] * 2))
    store.scatter(np.array([3, 1]), {"w": np.ones((2, 2, 3), np.float32), "b": np.array([1., 2.])})
    np.testing.assert_array_equal(store.gather([1, 3, 0])["b"], [2.0, 1.0, 7.0])
    np.testing.assert_array_equal(store.stacked()["w"][[1, 3]], np.ones((2, 2, 3)))
    if on_disk:
        store.flush()
        assert (tmp_path / "rows" / "leaf0.npy").exists()
        assert isinstance(store.leaves[0], np.memmap)


def test_bad_ids():
    store = ClientStateStore({"w": np.zeros(2, np.float32)}, 3)
    with pytest.raises(ValueError, match="ids"):
        store.gather([0, 3])
    with pytest.raises(ValueError, match="ids"):
        store.scatter(np.array([[0]]), {"w": np.zeros((1, 2))})


@pytest.fixture(scope="module")
def small():
    d = D.synthetic(1, 1, num_clients=8, seed=2, max_size=30, min_size=8)
    alg = ditto(models.logistic(10), lam=0.5, setup=Setup.of(client_lr=0.05, clients_per_round=4,
                                                             local_steps=3, batch_size=5))
    rounds = 6
    ref = run(alg, d, rounds=rounds, key=3, eval_every=rounds, progress=False).state
    return d, alg, rounds, ref


@pytest.mark.parametrize("prefetch", [True, False])
def test_store_run_equals_device_run(small, tmp_path, prefetch):
    d, alg, rounds, ref = small
    key = jax.random.key(3)
    server, store = store_for(alg, jax.random.split(key)[0], d, path=str(tmp_path / "s"))
    out = run_with_store(alg, d, store, rounds=rounds, key=key, server=server, prefetch=prefetch)
    # 4 of 8 clients per round: consecutive rounds share clients, so the prefetch patch is exercised
    k_rounds = jax.random.split(key)[1]
    ids = [set(np.asarray(alg.rows_round.sample(d, jax.random.fold_in(k_rounds, r))).tolist())
           for r in range(1, rounds + 1)]
    assert any(a & b for a, b in zip(ids, ids[1:]))
    rows = store.stacked()
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), rows, ref.rows)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), out.server.params,
                 ref.server.params)
    # the personal rows did change (the comparison is not between two initial states)
    assert not np.allclose(rows["Dense_0"]["kernel"][list(ids[0])],
                           np.asarray(ref.server.params["Dense_0"]["kernel"]))
    assert len(out.metrics) == rounds and np.isfinite(out.metrics[-1]["personal_loss"])


def test_store_personal_evaluation_matches_driver(small):
    d, alg, rounds, ref = small
    store = ClientStateStore(jax.tree.map(lambda x: x[0], ref.rows), d.num_clients)
    store.scatter(np.arange(d.num_clients), ref.rows)
    got = store_personal_sums(alg, ref.server, store, d.test, chunk=3)    # 3 does not divide 8
    want = jax.device_get(driver.evaluate(alg, ref, d))["test_personal"]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_store_needs_a_row_algorithm_and_matching_sizes(small):
    d, alg, _, _ = small
    store = ClientStateStore({"w": np.zeros(2, np.float32)}, 5)
    with pytest.raises(ValueError, match="per-client rows"):
        run_with_store(fedavg(models.logistic(10)), d, store, rounds=1, key=0)
    with pytest.raises(ValueError, match="store holds 5 clients"):
        run_with_store(alg, d, store, rounds=1, key=0)
    with pytest.raises(ValueError, match="rounds"):
        run_with_store(alg, d, store, rounds=0, key=0)


def test_store_run_equals_device_run_with_repeated_clients(tmp_path):
    """sampling="size" draws with replacement: a client can appear twice in a round, and a
    duplicated client of round t+1 that was also in round t needs every copy patched."""
    d = D.synthetic(1, 1, num_clients=5, seed=2, max_size=30, min_size=8)
    alg = ditto(models.logistic(10), lam=0.5, setup=Setup.of(
        client_lr=0.05, clients_per_round=4, local_steps=3, batch_size=5, sampling="size",
        stragglers=0.5))
    rounds, key = 8, jax.random.key(4)
    ref = run(alg, d, rounds=rounds, key=key, eval_every=rounds, progress=False).state
    k_rounds = jax.random.split(key)[1]
    ids = [np.asarray(alg.rows_round.sample(d, jax.random.fold_in(k_rounds, r)))
           for r in range(1, rounds + 1)]
    # the case the patch must handle: a client twice in round t+1 and also in round t
    assert any(np.sum(b == c) > 1 and c in a for a, b in zip(ids, ids[1:]) for c in set(b))
    server, store = store_for(alg, jax.random.split(key)[0], d)
    out = run_with_store(alg, d, store, rounds=rounds, key=key, server=server)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), store.stacked(),
                 ref.rows)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), out.server.params,
                 ref.server.params)
