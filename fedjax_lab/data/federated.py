"""FederatedArrays: every client's examples in one flat array per feature, cut by `offsets`.

Client k owns rows `offsets[k]:offsets[k+1]` of `x` and `y`. Nothing is padded to the largest
client, so power-law client sizes cost no memory. A client's held-out split (for personalized
evaluation) is another FederatedArrays with the same number of clients, in `test`.
The record is a pytree of device arrays; `num_classes` and the client size bounds are static
metadata (changing them retraces, as a shape change would).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@struct.dataclass
class FederatedArrays:
    x: jax.Array                     # [total, ...] features
    y: jax.Array                     # [total] integer labels
    offsets: jax.Array               # [num_clients + 1] int32, offsets[0] == 0, non-decreasing
    test: Optional["FederatedArrays"] = None
    num_classes: int = struct.field(pytree_node=False, default=0)
    # Static size bounds: they fix the shapes of on-device batch drawing at trace time.
    min_client_size: int = struct.field(pytree_node=False, default=0)
    max_client_size: int = struct.field(pytree_node=False, default=0)

    @property
    def num_clients(self) -> int:
        return self.offsets.shape[0] - 1

    @property
    def client_sizes(self) -> jax.Array:
        return jnp.diff(self.offsets)

    @property
    def num_examples(self) -> int:
        return self.x.shape[0]

    def client(self, k: int):
        """(x, y) of client k as device arrays (host-side convenience, not for hot paths)."""
        lo, hi = int(self.offsets[k]), int(self.offsets[k + 1])
        return self.x[lo:hi], self.y[lo:hi]

    def client_ids(self) -> jax.Array:
        """[total] owner of every example (for segment sums in evaluation)."""
        return jnp.searchsorted(self.offsets[1:], jnp.arange(self.num_examples), side="right")

    def label_counts(self) -> jax.Array:
        """[N, K] float32: n_{k,y}, the number of client k's examples of label y (on device, for
        rounds; data/stats.label_counts is the host-side table)."""
        return jax.ops.segment_sum(jax.nn.one_hot(self.y, self.num_classes), self.client_ids(),
                                   num_segments=self.num_clients)


def federated_arrays(x, y, offsets, *, test: Optional[FederatedArrays] = None, num_classes=None,
                     allow_empty: bool = False, name: str = "data") -> FederatedArrays:
    """Validate host arrays and place them on device as a FederatedArrays.

    Errors name the argument: x/y length mismatch, offsets not starting at 0, not ending at
    len(x), not non-decreasing, and empty clients when `allow_empty` is False.
    """
    x = np.asarray(x)
    y = np.asarray(y)
    offsets = np.asarray(offsets)
    if offsets.ndim != 1 or offsets.shape[0] < 2:
        raise ValueError(f"{name}: offsets must be a 1-D array of num_clients + 1 >= 2 entries, "
                         f"got shape {offsets.shape}")
    if not np.issubdtype(offsets.dtype, np.integer):
        raise ValueError(f"{name}: offsets must be integers, got dtype {offsets.dtype}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{name}: x and y must have the same length, got x: {x.shape[0]} rows and "
                         f"y: {y.shape[0]} rows")
    if y.ndim != 1:
        raise ValueError(f"{name}: y must be 1-D integer labels of shape [{x.shape[0]}], got {y.shape}")
    if offsets[0] != 0 or offsets[-1] != x.shape[0]:
        raise ValueError(f"{name}: offsets must start at 0 and end at len(x) = {x.shape[0]}, got "
                         f"offsets[0] = {offsets[0]}, offsets[-1] = {offsets[-1]}")
    sizes = np.diff(offsets)
    if np.any(sizes < 0):
        bad = int(np.argmax(sizes < 0))
        raise ValueError(f"{name}: offsets must be non-decreasing (monotone), but offsets[{bad + 1}] = "
                         f"{offsets[bad + 1]} < offsets[{bad}] = {offsets[bad]}")
    if not allow_empty and np.any(sizes == 0):
        empty = np.flatnonzero(sizes == 0)
        raise ValueError(f"{name}: clients {empty[:10].tolist()} have no examples (empty client); pass "
                         "allow_empty=True if that is intended")
    if test is not None and test.num_clients != sizes.shape[0]:
        raise ValueError(f"{name}: test split has {test.num_clients} clients, train has {sizes.shape[0]}")
    if num_classes is None:
        num_classes = int(y.max()) + 1 if y.size else 0
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"{name}: labels y must lie in [0, num_classes={num_classes}), got range "
                         f"[{y.min()}, {y.max()}]")
    x = x.astype(np.float32) if np.issubdtype(x.dtype, np.floating) else x
    return FederatedArrays(x=jnp.asarray(x), y=jnp.asarray(y, jnp.int32),
                           offsets=jnp.asarray(offsets, jnp.int32), test=test,
                           num_classes=int(num_classes), min_client_size=int(sizes.min()),
                           max_client_size=int(sizes.max()))


def from_client_lists(xs, ys, *, test_xs=None, test_ys=None, num_classes=None,
                      allow_empty=False) -> FederatedArrays:
    """Build from per-client lists of arrays (host side; concatenates once)."""
    if len(xs) != len(ys):
        raise ValueError(f"xs and ys must list the same number of clients, got {len(xs)} and {len(ys)}")
    if num_classes is None:
        all_y = [np.asarray(v) for v in list(ys) + list(test_ys or []) if np.asarray(v).size]
        num_classes = int(max(v.max() for v in all_y)) + 1 if all_y else 0
    test = None
    if test_xs is not None:
        test = from_client_lists(test_xs, test_ys, num_classes=num_classes, allow_empty=True)
    offsets = np.concatenate([[0], np.cumsum([len(v) for v in ys])]).astype(np.int64)
    x = np.concatenate([np.asarray(v) for v in xs]) if xs else np.zeros((0,))
    y = np.concatenate([np.asarray(v) for v in ys]) if ys else np.zeros((0,), np.int32)
    return federated_arrays(x, y, offsets, test=test, num_classes=num_classes, allow_empty=allow_empty)


def split_clients(x, y, client_of_example, num_clients, *, test_fraction=0.2, seed=0,
                  num_classes=None, allow_empty=False) -> FederatedArrays:
    """Group examples by owner; hold out round(test_fraction * n_k) random examples of each client
    (at least one, and never all, where the client has two or more) as its test split."""
    x, y = np.asarray(x), np.asarray(y)
    owner = np.asarray(client_of_example).astype(np.int64)
    if owner.shape[0] != x.shape[0]:
        raise ValueError(f"client_of_example must have one entry per example ({x.shape[0]}), "
                         f"got {owner.shape[0]}")
    if owner.size and (owner.min() < 0 or owner.max() >= num_clients):
        raise ValueError(f"client_of_example must lie in [0, num_clients={num_clients})")
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(owner.shape[0]), owner))      # by owner, shuffled within
    sizes = np.bincount(owner, minlength=num_clients)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rank = np.arange(owner.shape[0]) - starts[owner[order]]        # position inside its client
    n_test = np.rint(test_fraction * sizes).astype(np.int64)
    if test_fraction > 0:
        n_test = np.maximum(n_test, 1)
    n_test = np.where(sizes >= 2, np.minimum(n_test, sizes - 1), 0)
    is_test = rank < n_test[owner[order]]
    tr, te = order[~is_test], order[is_test]
    if num_classes is None:
        num_classes = int(y.max()) + 1 if y.size else 0
    test = federated_arrays(x[te], y[te], np.concatenate([[0], np.cumsum(n_test)]),
                            num_classes=num_classes, allow_empty=True, name="test split")
    return federated_arrays(x[tr], y[tr], np.concatenate([[0], np.cumsum(sizes - n_test)]),
                            test=test, num_classes=num_classes, allow_empty=allow_empty)
