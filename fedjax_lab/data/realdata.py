"""Centralized datasets -> FederatedArrays, and real data that needs no download.

`federate(x, y, ...)` is the one path every centralized dataset (scikit-learn digits, MNIST-1D,
the TFDS image sets) takes: a partitioner from `data.partition` assigns an owner to every training
example, and each client gets a test split in one of two ways:

  * `test="holdout"`: a held-out share (`test_fraction`) of the client's own examples
    (`federated.split_clients`), the usual setup for personalized evaluation;
  * `test="partition"`: the dataset's own test split, partitioned with the *same label skew* as
    the training split (`partition_like`): a test example of class c goes to client k with
    probability n_kc / n_c, where n_kc counts client k's training examples of class c. Under iid or
    power-law partitions this reproduces the client sizes, under Dirichlet/shards the skew.

Offline real data (DESIGN, "Real data with no download"):
  * `digits`: scikit-learn's `load_digits`, 1,797 real 8x8 handwritten digits (UCI optdigits),
    pixel values 0..16 scaled to [0, 1], x: [n, 8, 8, 1]. No official test split: `test="partition"`
    first holds out a stratified `test_fraction` of all examples, then partitions it like train.
  * `mnist1d`: Greydanus' MNIST-1D (`mnist1d.data.make_dataset(get_dataset_args())`), 10 classes,
    40-dim signals, standardized by the generator, its own 80/20 train/test split, x: [n, 40].
    Generation takes about a second; it is cached in memory per process.

Partitions are named as in dataset specs: "iid", "dirichlet=0.3" (alpha), "shards=2" (shards per
client), "power_law=2.0" (log-normal sigma of client sizes), or any callable
`f(labels, num_clients, seed) -> owner`.
"""
from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import random
from typing import Callable, Optional, Union

import numpy as np

from fedjax_lab.data import partition as partition_lib
from fedjax_lab.data.federated import FederatedArrays, federated_arrays, split_clients

PARTITIONS = ("iid", "dirichlet", "shards", "power_law")
TEST_MODES = ("holdout", "partition")
Partitioner = Callable[[np.ndarray, int, int], np.ndarray]


def make_partitioner(partition: Union[str, Partitioner] = "iid", value=None) -> Partitioner:
    """A partition name (optionally 'name=value') -> f(labels, num_clients, seed) -> owner."""
    if callable(partition):
        return partition
    if not isinstance(partition, str):
        raise ValueError(f"partition must be one of {list(PARTITIONS)} (optionally 'name=value') or a "
                         f"callable, got {partition!r}")
    name, _, v = partition.partition("=")
    name = name.strip().lower()
    if v:
        if value is not None:
            raise ValueError(f"partition: value given twice ({partition!r} and value={value!r})")
        value = v
    if name == "iid":
        if value is not None and str(value).lower() not in ("true", "1"):
            raise ValueError(f"partition 'iid' takes no value, got {value!r}")
        return lambda labels, n, seed: partition_lib.iid(len(labels), n, seed=seed)
    if name == "dirichlet":
        alpha = 0.5 if value is None else _positive(value, "dirichlet alpha", float)
        return lambda labels, n, seed: partition_lib.dirichlet(labels, n, alpha=alpha, seed=seed)
    if name == "shards":
        k = 2 if value is None else _positive(value, "shards (shards per client)", int)
        return lambda labels, n, seed: partition_lib.shards(labels, n, shards_per_client=k, seed=seed)
    if name == "power_law":
        sigma = 2.0 if value is None else _positive(value, "power_law sigma", float)
        return lambda labels, n, seed: partition_lib.power_law(len(labels), n, sigma=sigma, seed=seed)
    raise ValueError(f"unknown partition {name!r}; valid partitions: {list(PARTITIONS)} "
                     "(e.g. 'dirichlet=0.3', 'shards=2', 'power_law=2.0') or a callable")


def _positive(value, what, cast):
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a positive number, got {value!r}") from None
    if cast is int:
        if v != int(v):
            raise ValueError(f"{what} must be a positive integer, got {value!r}")
        v = int(v)
    if not v > 0:
        raise ValueError(f"{what} must be > 0, got {value!r}")
    return v


def partition_like(train_labels, train_owner, test_labels, num_clients: int, *,
                   seed: int = 0) -> np.ndarray:
    """Owner of every test example, with each client's class proportions taken from its training
    share: the test examples of class c are shuffled and cut among clients in proportion to
    n_kc / n_c. Classes absent from training are spread uniformly."""
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    train_owner = np.asarray(train_owner, np.int64)
    rng = np.random.default_rng(seed)
    owner = np.empty(test_labels.shape[0], np.int64)
    for c in np.unique(test_labels):        # loop over classes (host-side preparation)
        idx = rng.permutation(np.flatnonzero(test_labels == c))
        counts = np.bincount(train_owner[train_labels == c], minlength=num_clients).astype(np.float64)
        p = counts / counts.sum() if counts.sum() > 0 else np.full(num_clients, 1.0 / num_clients)
        cuts = np.rint(np.cumsum(p) * idx.shape[0]).astype(np.int64)
        sizes = np.diff(np.concatenate([[0], cuts]))
        sizes[-1] += idx.shape[0] - sizes.sum()
        owner[idx] = np.repeat(np.arange(num_clients), sizes)
    return owner


def federate(x, y, *, num_clients: int, partition: Union[str, Partitioner] = "iid", seed: int = 0,
             x_test=None, y_test=None, test: Optional[str] = None, test_fraction: float = 0.2,
             num_classes: Optional[int] = None) -> FederatedArrays:
    """Partition a centralized (x, y) over `num_clients` clients, each with a test split.

    `test` defaults to "partition" when a test split (x_test, y_test) is given, else "holdout".
    """
    x, y = np.asarray(x), np.asarray(y)
    if not isinstance(num_clients, (int, np.integer)) or num_clients <= 0:
        raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
    if num_clients > len(y):
        raise ValueError(f"num_clients={num_clients} exceeds the {len(y)} training examples")
    if test is None:
        test = "partition" if x_test is not None else "holdout"
    if test not in TEST_MODES:
        raise ValueError(f"test must be one of {list(TEST_MODES)}, got {test!r}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in [0, 1), got {test_fraction}")
    if num_classes is None:
        all_y = y if y_test is None else np.concatenate([y, np.asarray(y_test)])
        num_classes = int(all_y.max()) + 1
    partitioner = make_partitioner(partition)
    if test == "holdout":
        owner = partitioner(y, num_clients, seed)
        return split_clients(x, y, owner, num_clients, test_fraction=test_fraction, seed=seed + 1,
                             num_classes=num_classes)
    if x_test is None:
        # No official test split: hold out a stratified share first, then partition it like train.
        x, y, x_test, y_test = _stratified_split(x, y, test_fraction, seed + 2)
    owner = partitioner(y, num_clients, seed)
    x_test, y_test = np.asarray(x_test), np.asarray(y_test)
    test_owner = partition_like(y, owner, y_test, num_clients, seed=seed + 3)
    test_split = _grouped(x_test, y_test, test_owner, num_clients, num_classes, "test split", True)
    return _grouped(x, y, owner, num_clients, num_classes, "data", False, test_split)


def _grouped(x, y, owner, num_clients, num_classes, name, allow_empty, test=None):
    order = np.argsort(owner, kind="stable")
    sizes = np.bincount(owner, minlength=num_clients)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    return federated_arrays(x[order], y[order], offsets, test=test, num_classes=num_classes,
                            allow_empty=allow_empty, name=name)


def _stratified_split(x, y, fraction, seed):
    rng = np.random.default_rng(seed)
    is_test = np.zeros(len(y), bool)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        is_test[idx[:int(round(fraction * idx.shape[0]))]] = True
    return x[~is_test], y[~is_test], x[is_test], y[is_test]


# ---------------------------------------------------------------------------------------------
# Offline real data.

def _require(module, extra="realdata"):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise ImportError(f"this dataset needs the `{module.split('.')[0]}` package: "
                          f"pip install 'fedjax_lab[{extra}]'") from None


@functools.lru_cache(maxsize=2)
def _digits_arrays():
    # load_digits reads sklearn/datasets/data/digits.csv.gz; reading that file directly skips
    # importing scikit-learn (about 2 s), which matters for tests that build many datasets.
    spec = importlib.util.find_spec("sklearn")
    if spec is not None and spec.submodule_search_locations:
        f = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data",
                         "digits.csv.gz")
        if os.path.isfile(f):
            raw = np.loadtxt(f, delimiter=",", dtype=np.float32)
            return (raw[:, :64] / 16.0).reshape(-1, 8, 8, 1), raw[:, 64].astype(np.int32)
    d = _require("sklearn.datasets").load_digits()
    return (d.images.astype(np.float32) / 16.0)[..., None], d.target.astype(np.int32)


def digits(*, num_clients: int = 20, partition: Union[str, Partitioner] = "iid", seed: int = 0,
           test: str = "holdout", test_fraction: float = 0.2) -> FederatedArrays:
    """scikit-learn's 1,797 8x8 digits over `num_clients` clients; x: [n, 8, 8, 1] in [0, 1]."""
    x, y = _digits_arrays()
    return federate(x, y, num_clients=num_clients, partition=partition, seed=seed, test=test,
                    test_fraction=test_fraction, num_classes=10)


def _cache_dir():
    return os.environ.get("FEDJAX_LAB_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "fedjax_lab")


@functools.lru_cache(maxsize=4)
def _mnist1d_arrays(num_samples: int):
    """Generated once per process, and kept on disk (under $FEDJAX_LAB_CACHE, default
    ~/.cache/fedjax_lab, keyed by the mnist1d version) so later processes skip the seconds of
    generation; an unwritable cache is ignored."""
    try:
        version = importlib.metadata.version("mnist1d")
    except importlib.metadata.PackageNotFoundError:
        version = None
    keys = ("x", "y", "x_test", "y_test")
    path = os.path.join(_cache_dir(), f"mnist1d-{version}-{num_samples}.npz")
    if version is not None and os.path.isfile(path):
        try:
            with np.load(path) as f:
                return tuple(f[k] for k in keys)
        except (OSError, ValueError, KeyError):
            pass
    data_mod = _require("mnist1d.data")
    args = data_mod.get_dataset_args()
    args.num_samples = num_samples
    # make_dataset reseeds the global `random` and `np.random` generators; restore them after.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        d = data_mod.make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    out = tuple(np.asarray(d[k], dt) for k, dt in
                zip(keys, (np.float32, np.int32, np.float32, np.int32)))
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp.npz"
        np.savez(tmp, **dict(zip(keys, out)))
        os.replace(tmp, path)
    except OSError:
        pass
    return out


def mnist1d(*, num_clients: int = 50, partition: Union[str, Partitioner] = "iid", seed: int = 0,
            test: str = "partition", test_fraction: float = 0.2,
            num_samples: int = 5000) -> FederatedArrays:
    """MNIST-1D (generator seed 42, the published dataset at num_samples=5000: 4,000 train and
    1,000 test signals of length 40) over `num_clients` clients."""
    if num_samples < 20:
        raise ValueError(f"num_samples must be >= 20 (two per class), got {num_samples}")
    x, y, x_test, y_test = _mnist1d_arrays(int(num_samples))
    return federate(x, y, num_clients=num_clients, partition=partition, seed=seed, x_test=x_test,
                    y_test=y_test, test=test, test_fraction=test_fraction, num_classes=10)
