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
A file that is not such an archive raises ValueError naming it and this format; pickled (object)
arrays are never loaded.
"""
from __future__ import annotations

import os
import zipfile
import zlib
from typing import Optional

import numpy as np

from fedjax_lab.data.federated import FederatedArrays, federated_arrays, split_clients


def _owner(ids, known, name, path):
    pos = np.searchsorted(known, ids)
    pos = np.minimum(pos, len(known) - 1)
    bad = known[pos] != ids
    if np.any(bad):
        raise ValueError(f"npz:{path}: {name} has ids that are not training clients, e.g. "
                         f"{ids[np.flatnonzero(bad)[:3]].tolist()}")
    return pos


NPZ_FORMAT = ("expected an .npz written by numpy.savez (or fedjax_lab.data.save_npz) with arrays "
            "x [n, ...], y [n] integer labels, client_id [n] (optional x_test, y_test, "
            "client_id_test, num_classes; see fedjax_lab.data.npz)")


def _read(path):
    """{key: ndarray} of the archive at `path`; any failure -> ValueError naming the file."""
    def bad(why):
        return ValueError(f"npz:{path}: could not read as a .npz archive ({why}); {NPZ_FORMAT}")
    try:
        f = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        # numpy answers "contains pickled (object) data" for any file that is neither zip nor .npy
        raise bad("it is neither a zip archive nor a .npy file; pickles are never loaded"
                  if "pickled" in str(err) else f"numpy said: {type(err).__name__}: {err}") from err
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise bad("it is a single .npy array, not an archive of named arrays")
    with f:
        arrays = {}
        for k in f.files:
            try:
                arrays[k] = f[k]
            except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:
                raise bad(f"array {k!r}: {type(err).__name__}: {err}") from err
            if not isinstance(arrays[k], np.ndarray):   # numpy returns other zip members as bytes
                raise bad(f"member {k!r} is not a .npy array")
    return arrays


def load_npz(path, *, test_fraction: float = 0.2, seed: int = 0,
             num_classes: Optional[int] = None) -> FederatedArrays:
    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"npz:{path}: " + ("is a directory" if os.path.isdir(path) else
                                                   "file does not exist") + f"; {NPZ_FORMAT}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in [0, 1), got {test_fraction}")
    arrays = _read(path)
    missing = [k for k in ("x", "y", "client_id") if k not in arrays]
    if missing:
        raise ValueError(f"npz:{path}: lacks keys {missing}, found {sorted(arrays)}; {NPZ_FORMAT}")
    for sfx in ("", "_test"):
        x, y, cid = (arrays.get(k + sfx) for k in ("x", "y", "client_id"))
        if x is None:
            continue
        if x.ndim == 0 or (y is not None and y.ndim != 1) or (cid is not None and cid.ndim != 1):
            shapes = [None if a is None else a.shape for a in (x, y, cid)]
            raise ValueError(f"npz:{path}: x{sfx} must be [n, ...], y{sfx} and client_id{sfx} "
                             f"[n]; got shapes {shapes}")
        lengths = [len(a) for a in (x, y, cid) if a is not None]
        if len(set(lengths)) > 1:
            raise ValueError(f"npz:{path}: x{sfx}, y{sfx} and client_id{sfx} must have the same "
                             f"length, got {lengths}")
    x, y, cid = arrays["x"], arrays["y"], arrays["client_id"]
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"npz:{path}: y must hold integer labels, got dtype {y.dtype}")
    if len(y) == 0:
        raise ValueError(f"npz:{path}: the file holds no examples")
    if "num_classes" in arrays and (arrays["num_classes"].size != 1 or
                                    not np.issubdtype(arrays["num_classes"].dtype, np.integer)):
        raise ValueError(f"npz:{path}: num_classes must be one integer, got "
                         f"{arrays['num_classes']!r}")
    if num_classes is None and "num_classes" in arrays:
        num_classes = int(arrays["num_classes"])
    clients, owner = np.unique(cid, return_inverse=True)
    has_test = [k in arrays for k in ("x_test", "y_test", "client_id_test")]
    if any(has_test) and not all(has_test):
        raise ValueError(f"npz:{path}: give all of x_test, y_test, client_id_test or none of them")
    if not all(has_test):
        return split_clients(x, y, owner, len(clients), test_fraction=test_fraction, seed=seed,
                             num_classes=num_classes)
    xt, yt = arrays["x_test"], arrays["y_test"]
    towner = _owner(arrays["client_id_test"], clients, "client_id_test", path)
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
