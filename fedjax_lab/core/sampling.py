"""Which clients take part in a round, and how much local work each does. All on device."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def sample_clients(key, num_clients: int, clients_per_round: int, *, client_sizes=None,
                   scheme: str = "uniform"):
    """`clients_per_round` distinct client ids, in O(num_clients) work (no sort of all ids).

    scheme="uniform": uniformly without replacement (McMahan et al. 2017): the C smallest of N
    i.i.d. uniform keys form a uniformly random C-subset.
    scheme="size": with probability proportional to the client's number of examples p_k = n_k / n,
    without replacement (the FedProx paper's scheme; its code draws with numpy's
    `choice(replace=False, p=p_k)`, i.e. successive draws proportional to p among those left,
    which the Gumbel-top-k trick, top-C of log p_k + Gumbel, matches in distribution).
    Both use `lax.top_k` rather than a full permutation: at N = 1,000,000 and C = 1,000 this is the
    difference between ~0.03 s and several seconds a round on CPU.
    """
    if scheme == "uniform":
        scores = -jax.random.uniform(key, (num_clients,))
    elif scheme == "size":
        p = client_sizes.astype(jnp.float32)
        scores = jnp.log(p / p.sum()) + jax.random.gumbel(key, (num_clients,))
    else:
        raise ValueError(f"sampling scheme must be 'uniform' or 'size', got {scheme!r}")
    return jax.lax.top_k(scores, clients_per_round)[1].astype(jnp.int32)


def straggler_steps(key, full_steps, fraction: float, *, unit_steps=None, units: int | None = None):
    """Local steps per client when a fraction of them are stragglers (FedProx, Sec. 5.2).

    Exactly round(fraction * C) of the C sampled clients, chosen at random, are stragglers. A
    straggler does a uniformly random number k in [1, units) of work units instead of `units`
    (units = local epochs, or local steps), i.e. k * unit_steps steps (rounded up); everyone else
    does `full_steps`. With units <= 1 there is no smaller amount of work and stragglers do 1 unit.
    Returns (steps [C] int32, is_straggler [C] bool).
    """
    C = full_steps.shape[0]
    num_stragglers = int(round(fraction * C))
    k_pick, k_units = jax.random.split(key)
    is_straggler = jnp.zeros(C, bool).at[jax.random.permutation(k_pick, C)[:num_stragglers]].set(True)
    k = jax.random.randint(k_units, (C,), 1, max(units, 2))
    partial = jnp.minimum(jnp.ceil(k * unit_steps).astype(jnp.int32), full_steps)
    return jnp.where(is_straggler, partial, full_steps).astype(jnp.int32), is_straggler
