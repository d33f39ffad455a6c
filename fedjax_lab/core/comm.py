"""Communication accounting: how many bytes a round really sends, per client and in total.

Every algorithm reports, per round,
    bytes_up, bytes_down                        total over the round's clients
    bytes_up_per_client, bytes_down_per_client  the mean over the clients that send / receive
and the driver sums every `bytes_*` metric over rounds into `total_bytes_*` in metrics.jsonl (the
x-axis of compression papers). Sizes are static Python ints computed from shapes; only the number
of participating clients may be traced.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def dense_bytes(tree, *, dtype_bytes=None) -> int:
    """Bytes of a dense pytree: sum of leaf sizes times their itemsize (or `dtype_bytes` each)."""
    return sum(int(x.size) * (dtype_bytes or jnp.dtype(x.dtype).itemsize) for x in jax.tree.leaves(tree))


def sign_bytes(tree) -> int:
    """Bytes of one packed sign bit per coordinate: ceil(P / 8)."""
    return math.ceil(sum(int(x.size) for x in jax.tree.leaves(tree)) / 8)


def level_bytes(tree, num_levels: int) -> int:
    """Bytes of P values from `num_levels` possible ones, packed: ceil(P * ceil(log2 levels) / 8)."""
    bits = max(1, math.ceil(math.log2(max(num_levels, 2))))
    return math.ceil(sum(int(x.size) for x in jax.tree.leaves(tree)) * bits / 8)


def sketch_bytes(rows: int, cols: int, *, dtype_bytes: int = 4) -> int:
    """Bytes of a rows x cols count sketch."""
    return int(rows) * int(cols) * dtype_bytes


def round_metrics(*, up_per_client, down_per_client, num_up, num_down) -> dict:
    """The four bytes_* metrics of a round; num_up / num_down may be traced counts of clients."""
    num_up = jnp.asarray(num_up, jnp.float32)
    num_down = jnp.asarray(num_down, jnp.float32)
    up = jnp.float32(up_per_client)
    down = jnp.float32(down_per_client)
    return dict(bytes_up=num_up * up, bytes_down=num_down * down,
                bytes_up_per_client=jnp.where(num_up > 0, up, 0.0),
                bytes_down_per_client=jnp.where(num_down > 0, down, 0.0))
