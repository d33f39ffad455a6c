"""Pytree arithmetic used by every algorithm (written once here)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree


def tree_add(a, b):
    return jax.tree.map(jnp.add, a, b)


def tree_sub(a, b):
    return jax.tree.map(jnp.subtract, a, b)


def tree_scale(a, s):
    return jax.tree.map(lambda x: x * s, a)


def tree_zeros_like(a):
    return jax.tree.map(jnp.zeros_like, a)


def tree_vdot(a, b):
    """Sum over leaves of <a, b>."""
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def tree_sq_norm(a):
    """||a||^2 over all leaves."""
    return sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(a))


def tree_where(pred, a, b):
    """Leafwise `where(pred, a, b)` with a scalar predicate (masked steps keep the old value)."""
    return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


def tree_weighted_mean(stacked, weights):
    """sum_i w_i * x_i / sum_i w_i over the leading (client) axis of every leaf.

    A zero total weight (every sampled client dropped) gives zeros: the server then takes no step.
    """
    weights = jnp.asarray(weights, jnp.float32)
    total = jnp.sum(weights)
    norm = jnp.where(total > 0, weights / jnp.where(total > 0, total, 1.0), 0.0)
    return jax.tree.map(lambda x: jnp.tensordot(norm.astype(x.dtype), x, axes=1), stacked)


def tree_take(stacked, ids):
    """Rows `ids` of every leaf of a client-stacked pytree."""
    return jax.tree.map(lambda x: x[ids], stacked)


def tree_put(stacked, ids, rows):
    """Scatter `rows` back into the client-stacked pytree at `ids`."""
    return jax.tree.map(lambda x, r: x.at[ids].set(r), stacked, rows)


def tree_broadcast(tree, n):
    """Stack `n` copies of `tree` along a new leading axis."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), tree)


def flatten(tree):
    """(flat vector, unflatten) for a params pytree; the one ravel helper for sketches and distances."""
    return ravel_pytree(tree)


def tree_num_params(tree) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))
