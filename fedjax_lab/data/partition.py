"""Partitioners: centralized labels -> client id of every example. Pure functions of a seed.

Each returns `owner: int64[num_examples]` with values in [0, num_clients); `split_clients`
(data.federated) turns (x, y, owner) into FederatedArrays with per-client test splits.
"""
from __future__ import annotations

import numpy as np


def _check(num_examples, num_clients):
    if num_clients <= 0:
        raise ValueError(f"num_clients must be > 0, got {num_clients}")
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}")


def _owner_from_sizes(order, sizes):
    owner = np.empty(order.shape[0], np.int64)
    owner[order] = np.repeat(np.arange(sizes.shape[0]), sizes)
    return owner


def iid(num_examples: int, num_clients: int, *, seed: int = 0) -> np.ndarray:
    """Uniformly shuffled, sizes as equal as possible (differ by at most one)."""
    _check(num_examples, num_clients)
    rng = np.random.default_rng(seed)
    sizes = np.full(num_clients, num_examples // num_clients)
    sizes[: num_examples % num_clients] += 1
    return _owner_from_sizes(rng.permutation(num_examples), sizes)


def power_law(num_examples: int, num_clients: int, *, sigma: float = 2.0, min_size: int = 1,
              seed: int = 0) -> np.ndarray:
    """IID labels, log-normal(0, sigma) client sizes (each at least `min_size`)."""
    _check(num_examples, num_clients)
    if min_size * num_clients > num_examples:
        raise ValueError(f"min_size={min_size} x num_clients={num_clients} exceeds num_examples="
                         f"{num_examples}")
    rng = np.random.default_rng(seed)
    w = rng.lognormal(0.0, sigma, num_clients)
    extra = num_examples - min_size * num_clients
    sizes = min_size + np.floor(extra * w / w.sum()).astype(np.int64)
    rest = num_examples - sizes.sum()
    sizes[np.argsort(-w)[:rest]] += 1     # hand out the rounding remainder to the largest
    return _owner_from_sizes(rng.permutation(num_examples), sizes)


def dirichlet(labels, num_clients: int, *, alpha: float, seed: int = 0,
              min_size: int = 0) -> np.ndarray:
    """Label skew: for every class c, split its examples over clients by p_c ~ Dir(alpha * 1).

    Small alpha -> few classes per client (Hsu et al. 2019). `min_size > 0` redraws (up to 100
    times, as in common practice) until every client holds at least `min_size` examples.
    """
    labels = np.asarray(labels)
    _check(labels.shape[0], num_clients)
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if min_size * num_clients > labels.shape[0]:
        raise ValueError(f"min_size={min_size} x num_clients={num_clients} exceeds num_examples")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(100):
        owner = np.empty(labels.shape[0], np.int64)
        for c in classes:            # loop over classes (data preparation), vectorized over clients
            idx = rng.permutation(np.flatnonzero(labels == c))
            p = rng.dirichlet(np.full(num_clients, alpha))
            cuts = np.floor(np.cumsum(p)[:-1] * idx.shape[0]).astype(np.int64)
            owner[idx] = np.repeat(np.arange(num_clients), np.diff(np.concatenate([[0], cuts,
                                                                                    [idx.shape[0]]])))
        if np.bincount(owner, minlength=num_clients).min() >= min_size:
            return owner
    raise ValueError(f"dirichlet: could not give every client >= min_size={min_size} examples with "
                     f"alpha={alpha}; lower min_size or raise alpha")


def shards(labels, num_clients: int, *, shards_per_client: int = 2, seed: int = 0) -> np.ndarray:
    """McMahan et al. (2017) pathological non-IID: sort by label, cut into
    num_clients * shards_per_client equal shards, give each client `shards_per_client` random shards."""
    labels = np.asarray(labels)
    _check(labels.shape[0], num_clients)
    if shards_per_client <= 0:
        raise ValueError(f"shards_per_client must be > 0, got {shards_per_client}")
    num_shards = num_clients * shards_per_client
    if num_shards > labels.shape[0]:
        raise ValueError(f"num_clients * shards_per_client = {num_shards} exceeds num_examples = "
                         f"{labels.shape[0]}")
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(labels.shape[0]), labels))
    shard_of_pos = np.arange(labels.shape[0]) * num_shards // labels.shape[0]
    client_of_shard = rng.permutation(num_shards) // shards_per_client
    owner = np.empty(labels.shape[0], np.int64)
    owner[order] = client_of_shard[shard_of_pos]
    return owner
