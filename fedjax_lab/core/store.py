"""Per-client rows on the host, for when N x row size does not fit on the device.

`ClientStateStore` keeps one numpy array per leaf of a client's row, [N, *leaf.shape], in memory or
as `np.memmap` files under `path`. `run_with_store` runs a stateful algorithm (`RowAlgorithm`,
core/client_state.py) with its rows in such a store: every round it hands the sampled rows to the
jitted `step` and takes the new rows back, so only C rows per round travel to the device.

Prefetch. Round t's client ids depend only on the round key (`RowRound.sample(data, key)`), so the
ids of many rounds are computed ahead in one device call. While the device computes round t, a
single host worker thread gathers round t+1's rows; after round t it writes round t's rows back.
The worker runs jobs in submission order (gather t+1, then scatter t, then gather t+2 ...), so a
gather can miss only the rows of the round just before it; those clients (sampled in both rounds)
get their rows patched from round t's output before round t+1 starts. The result is the same,
bit for bit, as running the algorithm with all N rows on the device (`driver.run`), which
`tests/test_store.py` checks.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab.core import validate
from fedjax_lab.core.client_state import RowAlgorithm


class ClientStateStore:
    """Rows of N clients on the host: leaf arrays [N, ...] (numpy, or np.memmap under `path`)."""

    def __init__(self, row, num_clients: int, *, path: Optional[str] = None, fill: bool = True,
                 chunk_rows: int = 1 << 16):
        """`row`: one client's row (a pytree of arrays); every client starts with it when `fill`."""
        validate.positive("num_clients", num_clients, integer=True)
        leaves, self.treedef = jax.tree.flatten(jax.device_get(row))
        self.num_clients = num_clients
        self.path = path
        self.leaves = []
        if path is not None:
            os.makedirs(path, exist_ok=True)
        for i, leaf in enumerate(leaves):
            leaf = np.asarray(leaf)
            shape = (num_clients,) + leaf.shape
            if path is None:
                arr = np.empty(shape, leaf.dtype)
            else:
                arr = np.lib.format.open_memmap(os.path.join(path, f"leaf{i}.npy"), mode="w+",
                                                dtype=leaf.dtype, shape=shape)
            if fill:
                for lo in range(0, num_clients, chunk_rows):
                    arr[lo:lo + chunk_rows] = leaf
            self.leaves.append(arr)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.leaves)

    def gather(self, ids):
        """Rows `ids` ([C] ints) as a pytree of numpy arrays [C, ...] (a copy)."""
        ids = np.asarray(ids)
        self._check_ids(ids)
        return jax.tree.unflatten(self.treedef, [np.take(a, ids, axis=0) for a in self.leaves])

    def scatter(self, ids, rows):
        """Write `rows` ([C, ...] per leaf) back at `ids`; a repeated id gets its last row."""
        ids = np.asarray(ids)
        self._check_ids(ids)
        for a, r in zip(self.leaves, jax.tree.leaves(rows)):
            a[ids] = np.asarray(r)

    def stacked(self):
        """All rows as one pytree of arrays [N, ...] (views, no copy)."""
        return jax.tree.unflatten(self.treedef, list(self.leaves))

    def flush(self):
        for a in self.leaves:
            if isinstance(a, np.memmap):
                a.flush()

    def _check_ids(self, ids):
        if ids.ndim != 1 or (ids.size and (ids.min() < 0 or ids.max() >= self.num_clients)):
            raise ValueError(f"ids must be a 1-D array of client ids in [0, {self.num_clients}), "
                             f"got shape {ids.shape}"
                             + (f" and range [{ids.min()}, {ids.max()}]" if ids.size else ""))


def store_for(alg: RowAlgorithm, key, data, *, path: Optional[str] = None):
    """(server state, store) initialized as `alg.init(key, data)` would, rows on the host."""
    spec = _spec(alg)
    server = spec.init_server(key, data)
    return server, ClientStateStore(spec.init_row(server), data.num_clients, path=path)


@dataclasses.dataclass
class StoreRun:
    server: Any
    metrics: list          # one dict of floats per round
    seconds: float         # wall time of the rounds (after compilation)
    rounds_per_second: float
    wait_seconds: float    # time the round loop waited for the host gathers (0 = fully hidden)


def run_with_store(alg: RowAlgorithm, data, store: ClientStateStore, *, rounds: int, key,
                   server=None, first_round: int = 0, prefetch: bool = True,
                   ids_chunk: int = 8) -> StoreRun:
    """Rounds first_round + 1 ... first_round + rounds of `alg` with its rows in `store`.

    Keys follow `driver.run`: key -> (k_init, k_rounds), round r uses fold_in(k_rounds, r); pass the
    int seed or key given to `run` and the same rows and server state come out. `server` defaults
    to the initial server state for that key. `prefetch=False` gathers each round's rows only when
    it starts (for comparison). The ids of `ids_chunk` rounds are sampled in one device call; the
    timing includes that sampling.
    """
    spec = _spec(alg)
    validate.positive("rounds", rounds, integer=True)
    if store.num_clients != data.num_clients:
        raise ValueError(f"store holds {store.num_clients} clients, data has {data.num_clients}")
    alg.check(data)
    key = jax.random.key(key) if isinstance(key, (int, np.integer)) else key
    k_init, k_rounds = jax.random.split(key)
    if server is None:
        server = spec.init_server(k_init, data)

    round_ids = {}

    def ids_of(t):            # t: 0-based index into this call's rounds
        if t not in round_ids:
            lo = t - t % ids_chunk
            rs = first_round + 1 + np.arange(lo, min(lo + ids_chunk, rounds))
            for i, ids in enumerate(np.asarray(_sample_many(alg, data, k_rounds,
                                                            jnp.asarray(rs, jnp.int32)))):
                round_ids[lo + i] = ids
        return round_ids.pop(t)

    metrics, wait = [], 0.0
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as worker:
        start = time.perf_counter()
        ids = ids_of(0)
        pending = worker.submit(store.gather, ids)
        for t in range(rounds):
            t0 = time.perf_counter()
            rows = pending.result()
            wait += time.perf_counter() - t0
            server, new_rows, m = _step(alg, server, rows, jnp.asarray(ids), data, k_rounds,
                                        jnp.int32(first_round + 1 + t))
            next_ids = ids_of(t + 1) if t + 1 < rounds else None
            if next_ids is not None and prefetch:
                pending = worker.submit(store.gather, next_ids)    # overlaps the device work
            new_rows = jax.device_get(new_rows)
            worker.submit(store.scatter, ids, new_rows)
            metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
            if next_ids is None:
                break
            if not prefetch:
                pending = worker.submit(store.gather, next_ids)
            else:
                pending = _patched(worker, pending, next_ids, ids, new_rows)
            ids = next_ids
        worker.shutdown(wait=True)
    seconds = time.perf_counter() - start
    return StoreRun(server=server, metrics=metrics, seconds=seconds,
                    rounds_per_second=rounds / max(seconds, 1e-9), wait_seconds=wait)


@functools.partial(jax.jit, static_argnames=("alg",))
def _sample_many(alg, data, k_rounds, rs):
    return jax.vmap(lambda r: alg.rows_round.sample(data, jax.random.fold_in(k_rounds, r)))(rs)


@functools.partial(jax.jit, static_argnames=("alg",), donate_argnames=("server",))
def _step(alg, server, rows, ids, data, k_rounds, r):
    return alg.rows_round.step(server, rows, ids, data, jax.random.fold_in(k_rounds, r))


def _patched(worker, pending, next_ids, ids, new_rows):
    """The prefetched rows of `next_ids`, with the clients also in `ids` taken from `new_rows`
    (the prefetch ran before round t's rows were written back). Every copy of a client drawn more
    than once (sampling with replacement) is patched; its copies in `new_rows` are identical."""
    at_next = np.flatnonzero(np.isin(next_ids, ids))
    if at_next.size == 0:
        return pending
    order = np.argsort(ids, kind="stable")
    at_prev = order[np.searchsorted(ids, next_ids[at_next], sorter=order)]

    def patch():
        rows = pending.result()
        return jax.tree.map(lambda r, n: _set(r, at_next, n[at_prev]), rows, new_rows)
    return _Lazy(patch)


class _Lazy:
    """Future-like: runs `fn` (the patch, on the caller's thread) when the result is asked for."""
    def __init__(self, fn):
        self.fn = fn

    def result(self):
        return self.fn()


def _set(rows, at, values):
    rows[at] = values
    return rows


def store_personal_sums(alg: RowAlgorithm, server, store: ClientStateStore, split, ids=None, *,
                        chunk: int = 1024):
    """Per-client (loss, correct, count) sums on `split` for clients `ids` (default: all) deployed
    with their personalized params from the store; rows are gathered chunk by chunk on the host."""
    from fedjax_lab.core.evaluate import client_sums
    spec = _spec(alg)
    ids = np.arange(split.num_clients) if ids is None else np.asarray(ids)
    fn = jax.jit(lambda s, rows, sp, chunk_ids: client_sums(alg.model, spec.params(s, rows), sp,
                                                            chunk_ids))
    out = [[], [], []]
    for lo in range(0, ids.shape[0], chunk):
        part = ids[lo:lo + chunk]
        padded = np.concatenate([part, np.full(chunk - part.shape[0], part[0])])
        sums = jax.device_get(fn(server, store.gather(padded), split, jnp.asarray(padded)))
        for o, v in zip(out, sums):
            o.append(np.asarray(v)[:part.shape[0]])
    return tuple(np.concatenate(o) for o in out)


def _spec(alg):
    spec = getattr(alg, "rows_round", None)
    if spec is None:
        raise ValueError(f"algorithm {getattr(alg, 'name', alg)!r} has no per-client rows that a "
                         "ClientStateStore can hold (expected a RowAlgorithm with rows_round, e.g. "
                         "ditto)")
    return spec
