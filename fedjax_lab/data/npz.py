"""A plain `.npz` of (x, y, client_id): the simplest way to bring your own federated data.

Keys:
  x [n, ...]        features (any numeric dtype; floats are stored as float32 on device)
  y [n]             integer labels
  client_id [n]     owner of every example (integers or strings); clients are ordered by
                    sorted id (np.unique), so integer ids 0..N-1 keep their numbers
  x_test, y_test, client_id_test   optional explicit per-client test split; test ids must be
                    train ids (a test-only client has no training data to be one of our rows)
  num_classes       optional scalar (else max label + 1)

Without the test keys each client holds out `test_fraction` of its examples
(`federated.split_clients`, seeded). `save_npz(data, path)` writes any FederatedArrays in this
format, test split included, so `load_npz(save_npz(data, path))` gives `data` back exactly.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from fedjax_lab.data.federated import FederatedArrays, federated_arrays, split_clients


def _owner(ids, known, name):
    pos = np.searchsorted(known, ids)
    pos = np.minimum(pos, len(known) - 1)
    bad = known[pos] != ids
    if np.any(bad):
        raise ValueError(f"npz: {name} has ids that are not training clients, e.g. "
                         f"{ids[np.flatnonzero(bad)[:3]].tolist()}")
    return pos


def load_npz(path, *, test_fraction: float = 0.2, seed: int = 0,
             num_classes: Optional[int] = None) -> FederatedArrays:
    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"npz: file {path!r} does not exist")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in [0, 1), got {test_fraction}")
    with np.load(path, allow_pickle=False) as f:
        missing = [k for k in ("x", "y", "client_id") if k not in f.files]
        if missing:
            raise ValueError(f"npz: {path!r} lacks keys {missing}; expected x, y, client_id "
                             f"(optional x_test, y_test, client_id_test), found {f.files}")
        arrays = {k: f[k] for k in f.files}
    x, y, cid = arrays["x"], arrays["y"], arrays["client_id"]
    if not (len(x) == len(y) == len(cid)):
        raise ValueError(f"npz: x, y and client_id must have the same length, got {len(x)}, "
                         f"{len(y)}, {len(cid)}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"npz: y must hold integer labels, got dtype {y.dtype}")
    if len(y) == 0:
        raise ValueError("npz: the file holds no examples")
    if num_classes is None and "num_classes" in arrays:
        num_classes = int(arrays["num_classes"])
    clients, owner = np.unique(cid, return_inverse=True)
    has_test = [k in arrays for k in ("x_test", "y_test", "client_id_test")]
    if any(has_test) and not all(has_test):
        raise ValueError("npz: give all of x_test, y_test, client_id_test or none of them")
    if not all(has_test):
        return split_clients(x, y, owner, len(clients), test_fraction=test_fraction, seed=seed,
                             num_classes=num_classes)
    xt, yt = arrays["x_test"], arrays["y_test"]
    towner = _owner(arrays["client_id_test"], clients, "client_id_test")
    if num_classes is None:
        num_classes = int(max(y.max(), yt.max() if yt.size else 0)) + 1
    test = _grouped(xt, yt, towner, len(clients), num_classes, "test split", True)
    return _grouped(x, y, owner, len(clients), num_classes, "data", False, test)


def _grouped(x, y, owner, n, num_classes, name, allow_empty, test=None):
    order = np.argsort(owner, kind="stable")
    offsets = np.concatenate([[0], np.cumsum(np.bincount(owner, minlength=n))])
    return federated_arrays(x[order], y[order], offsets, test=test, num_classes=num_classes,
                            allow_empty=allow_empty, name=name)


def save_npz(data: FederatedArrays, path) -> str:
    """Write `data` (and its test split) as an .npz with integer client ids 0..N-1."""
    out = {"x": np.asarray(data.x), "y": np.asarray(data.y),
           "client_id": np.repeat(np.arange(data.num_clients), np.asarray(data.client_sizes)),
           "num_classes": np.asarray(data.num_classes)}
    if data.test is not None:
        out.update(x_test=np.asarray(data.test.x), y_test=np.asarray(data.test.y),
                   client_id_test=np.repeat(np.arange(data.num_clients),
                                            np.asarray(data.test.client_sizes)))
    path = os.path.expanduser(str(path))
    np.savez(path, **out)
    return path if path.endswith(".npz") else path + ".npz"
