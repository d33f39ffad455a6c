"""Aggregators that look at whole update vectors (distances between clients), not coordinates.

Geometric median (smoothed Weiszfeld, as in RFA, Pillutla et al. 2019), fixed iterations:
    z_0 = sum_k p_k u_k / sum_k p_k
    z_{j+1} = sum_k b_k u_k / sum_k b_k,   b_k = p_k / max(nu, ||u_k - z_j||)
It minimizes sum_k p_k ||u_k - z|| (smoothed at scale nu); absent clients (p_k = 0) have b_k = 0.

Krum / multi-Krum (Blanchard et al., NeurIPS 2017; El Mhamdi et al., ICML 2018): with n present
clients of which at most f are Byzantine, the score of client i is
    s(i) = sum of ||u_i - u_j||^2 over its n - f - 2 nearest present neighbours j != i,
Krum returns the update with the lowest score, multi-Krum the plain average of the m lowest-scored
(m = 1 is Krum). The papers require n >= 2f + 3; `check_krum` enforces it for the static
clients_per_round, and at run time (fewer present clients) at least one neighbour is always used.
Pairwise distances come from the Gram matrix of the updates centred on their mean (translation
does not change distances, and centring avoids the cancellation of ||a||^2 + ||b||^2 - 2<a, b>).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_lab.aggregators.coordinate import client_norms, present_mask
from fedjax_lab.core.tree import tree_weighted_mean


def _flat(updates):
    """[C, P] float32 matrix of the clients' flattened updates."""
    return jnp.concatenate([x.reshape(x.shape[0], -1).astype(jnp.float32)
                            for x in jax.tree.leaves(updates)], axis=1)


def geometric_median(updates, weights, *, iters: int = 10, nu: float = 1e-6):
    """Weighted geometric median by `iters` smoothed Weiszfeld steps (see module docstring)."""
    p = jnp.asarray(weights, jnp.float32)

    def step(_, z):
        dist = client_norms(jax.tree.map(lambda x, zx: x - zx[None], updates, z))
        return tree_weighted_mean(updates, p / jnp.maximum(dist, nu))

    return jax.lax.fori_loop(0, iters, step, tree_weighted_mean(updates, p))


def pairwise_sq_distances(updates, present):
    """[C, C] squared distances between present clients' updates (+inf where either is absent or i == j)."""
    X = _flat(updates)
    pm = present.astype(jnp.float32)
    center = (pm @ X) / jnp.maximum(jnp.sum(pm), 1.0)
    X = X - center
    G = X @ X.T
    sq = jnp.diag(G)
    D = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * G, 0.0)
    C = D.shape[0]
    ok = present[:, None] & present[None, :] & ~jnp.eye(C, dtype=bool)
    return jnp.where(ok, D, jnp.inf)


def krum_scores(updates, weights, *, f: int):
    """[C] Krum scores (inf for absent clients)."""
    present = present_mask(weights)
    n = jnp.sum(present)
    D = jnp.sort(pairwise_sq_distances(updates, present), axis=1)
    k = jnp.clip(n - f - 2, 1, jnp.maximum(n - 1, 1))
    near = jnp.arange(D.shape[1])[None, :] < k
    score = jnp.sum(jnp.where(near, D, 0.0), axis=1)
    return jnp.where(present, score, jnp.inf)


def krum_selection(updates, weights, *, f: int, m: int = 1):
    """[C] bool: the m (at most n) present clients with the lowest Krum scores."""
    score = krum_scores(updates, weights, f=f)
    n = jnp.sum(present_mask(weights))
    rank = jnp.argsort(jnp.argsort(score))      # position of each client in score order
    return (rank < jnp.minimum(m, n)) & present_mask(weights)


def krum(updates, weights, *, f: int, m: int = 1):
    """Multi-Krum: plain average of the m selected updates (Krum when m = 1)."""
    return tree_weighted_mean(updates, krum_selection(updates, weights, f=f, m=m).astype(jnp.float32))


def check_krum(num_clients: int, f: int, m: int):
    """Blanchard et al.'s condition n >= 2f + 3, and 1 <= m <= n - f."""
    if not isinstance(f, int) or f < 0:
        raise ValueError(f"krum: f (aggregator_f) must be an integer >= 0, got {f!r}")
    if num_clients < 2 * f + 3:
        raise ValueError(f"krum: f={f} (aggregator_f) is too large for {num_clients} clients per "
                         f"round: Krum needs clients_per_round >= 2 f + 3 = {2 * f + 3} (expected "
                         f"f <= {(num_clients - 3) // 2} here, and at least 3 clients per round)")
    if not isinstance(m, int) or not 1 <= m <= num_clients - f:
        raise ValueError(f"multi_krum: m (aggregator_m) must be an integer in "
                         f"[1, clients_per_round - f] = [1, {num_clients - f}], got {m!r}")
