"""Coordinate-wise aggregators over stacked client updates `[C, ...]` (every leaf of a pytree).

Each takes `(updates, weights)` with `weights [C] >= 0`; a client with weight 0 (a dropped straggler,
a padding row) is *absent*: it is not a vote, not an order statistic, not part of any mean.

    mean            sum_k p_k u_k / sum_k p_k                               (FedAvg)
    median          med_{k present} u_k, coordinate-wise                    (Yin et al., ICML 2018)
    trimmed_mean    per coordinate, drop the floor(beta m) largest and smallest of the m present
                    values and average the rest                              (Yin et al., ICML 2018)
    sign_vote       sign(sum_{k present} sign(u_k))                          (Bernstein et al., 2019)
    norm_clip       sum_k p_k u_k min(1, tau/||u_k||) / sum_k p_k            (Sun et al., 2019)

Median, trimmed mean and the vote use the weights only as a presence mask (one client, one vote,
as in the papers); the mean and clipping use them as weights. Absent rows are sorted to the end with
a +inf sentinel, so order statistics over a traced number m of present clients need no Python branch.
With no client present every aggregator returns zeros (the server takes no step).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_lab.core.tree import tree_weighted_mean


def _expand(v, x):
    """[C] -> [C, 1, ..., 1] to broadcast against leaf x of shape [C, ...]."""
    return v.reshape(v.shape + (1,) * (x.ndim - 1))


def present_mask(weights):
    return jnp.asarray(weights) > 0


def _sorted_present(x, present):
    """Sort along the client axis with absent rows replaced by +inf (they land after the m present)."""
    return jnp.sort(jnp.where(_expand(present, x), x, jnp.inf), axis=0)


def mean(updates, weights):
    """Weighted mean sum_k p_k u_k / sum_k p_k (zeros when every weight is 0)."""
    return tree_weighted_mean(updates, weights)


def median(updates, weights):
    """Coordinate-wise median of the present clients (mean of the two middle values when m is even)."""
    present = present_mask(weights)
    m = jnp.sum(present)
    lo, hi = jnp.maximum(m - 1, 0) // 2, m // 2

    def leaf(x):
        s = _sorted_present(x, present)
        med = 0.5 * (jax.lax.dynamic_index_in_dim(s, lo, keepdims=False)
                     + jax.lax.dynamic_index_in_dim(s, jnp.minimum(hi, x.shape[0] - 1), keepdims=False))
        return jnp.where(m > 0, med, 0.0).astype(x.dtype)
    return jax.tree.map(leaf, updates)


def trimmed_mean(updates, weights, *, beta: float):
    """Coordinate-wise beta-trimmed mean: of the m present values drop k = floor(beta m) at each end.

    beta < 1/2 keeps m - 2k >= 1 values whenever m >= 1.
    """
    present = present_mask(weights)
    m = jnp.sum(present)
    k = jnp.floor(beta * m).astype(m.dtype)
    kept = m - 2 * k

    def leaf(x):
        s = _sorted_present(x, present)
        r = _expand(jnp.arange(x.shape[0]), x)
        keep = (r >= k) & (r < m - k)
        total = jnp.sum(jnp.where(keep, s, 0.0), axis=0)
        return jnp.where(kept > 0, total / jnp.maximum(kept, 1), 0.0).astype(x.dtype)
    return jax.tree.map(leaf, updates)


def sign_vote(updates, weights):
    """Majority vote of the present clients' signs: sign(sum_k sign(u_k)); a tie gives 0."""
    present = present_mask(weights)
    return jax.tree.map(
        lambda x: jnp.sign(jnp.sum(jnp.where(_expand(present, x), jnp.sign(x), 0), axis=0)).astype(x.dtype),
        updates)


def client_norms(updates):
    """[C] Euclidean norm of every client's whole update (over all leaves)."""
    sq = sum(jnp.sum(jnp.square(x).reshape(x.shape[0], -1), axis=1) for x in jax.tree.leaves(updates))
    return jnp.sqrt(sq)


def norm_clip(updates, weights, *, clip_norm: float):
    """Clip every update to norm <= clip_norm, then take the weighted mean."""
    scale = jnp.minimum(1.0, clip_norm / jnp.maximum(client_norms(updates), 1e-12))
    clipped = jax.tree.map(lambda x: x * _expand(scale, x).astype(x.dtype), updates)
    return tree_weighted_mean(clipped, weights)
