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


def nway_kshot(labels, num_clients: int, *, ways: int, shots: int, stdev: int = 2,
               seed: int = 0) -> np.ndarray:
    """FedProto's n-way k-shot split (Tan et al., AAAI 2022, Sec. 5.1): client i holds n_i
    classes drawn without replacement, n_i uniform on [max(2, n - stdev), min(C, n + stdev)]
    (n = `ways`, C = number of classes in `labels`), and k_i examples of each of them, k_i
    uniform on [max(1, k - stdev), k + stdev] (k = `shots`). Clients' examples are disjoint.

    Unlike the other partitioners, most examples usually belong to nobody: `owner` is -1 there
    (keep `owner >= 0` before `federated.split_clients`). Paper vs. code: the official code
    (yuetan031/FedProto, exps/federated_main.py) draws n_i with numpy's randint(max(2, n - s),
    min(C, n + s + 1)), i.e. at most C - 1 classes when n + s >= C, and for MNIST k_i from
    randint(k - s + 1, k + s - 1) = [k - s + 1, k + s - 2]; we take the symmetric ranges the paper
    describes. ValueError when a class runs out of examples (lower `shots` or `num_clients`).
    """
    labels = np.asarray(labels)
    _check(labels.shape[0], num_clients)
    for name, v, lo in (("ways", ways, 1), ("shots", shots, 1), ("stdev", stdev, 0)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    classes = np.unique(labels)
    if ways > classes.shape[0]:
        raise ValueError(f"ways={ways} exceeds the {classes.shape[0]} classes in labels")
    rng = np.random.default_rng(seed)
    lo_n, hi_n = max(2, ways - stdev), min(classes.shape[0], ways + stdev)
    lo_n = min(lo_n, hi_n)                         # ways = 1 with one class, or two classes only
    n_i = rng.integers(lo_n, hi_n + 1, num_clients)
    k_i = rng.integers(max(1, shots - stdev), shots + stdev + 1, num_clients)
    pools = {c: list(rng.permutation(np.flatnonzero(labels == c))) for c in classes}
    owner = np.full(labels.shape[0], -1, np.int64)
    for i in range(num_clients):      # host-side data preparation, once per dataset
        for c in rng.choice(classes, n_i[i], replace=False):
            if len(pools[c]) < k_i[i]:
                raise ValueError(f"nway_kshot: class {c} ran out of examples at client {i} "
                                 f"(needs {k_i[i]}, {len(pools[c])} left); lower shots={shots} "
                                 f"or num_clients={num_clients}")
            take, pools[c] = pools[c][:k_i[i]], pools[c][k_i[i]:]
            owner[take] = i
    return owner
