"""Which clients take part in a round, and how much local work each does. All on device."""
from __future__ import annotations

import jax
import jax.numpy as jnp

SCHEMES = ("uniform", "size", "size_distinct")
STRAGGLER_WORK = ("code", "paper")


def sample_clients(key, num_clients: int, clients_per_round: int, *, client_sizes=None,
                   scheme: str = "uniform"):
    """[C] client ids for one round, C = `clients_per_round`, in O(N + C log N) work for N clients.

    scheme="uniform": C distinct clients, uniformly without replacement (McMahan et al. 2017): the
      C smallest of N i.i.d. uniform keys form a uniformly random C-subset.
    scheme="size": C i.i.d. draws with P(k) = p_k = n_k / n, *with* replacement (FedProx paper,
      Algorithm 2). A client drawn twice appears twice and counts twice in a uniform average, which
      makes (1/C) sum_j Delta_{k_j} an unbiased estimate of sum_k p_k Delta_k. Drawn by inverse CDF
      on the integer prefix sums of n_k, so P(k) is exactly n_k / n and empty clients never occur.
    scheme="size_distinct": C *distinct* clients by successive draws proportional to p_k among those
      left (numpy's `choice(replace=False, p=p_k)`), via the Gumbel-top-k trick (top C of
      log p_k + Gumbel noise). Biased: a large client can be drawn at most once, so with C > 1 the
      inclusion probabilities are not proportional to p_k and a uniform average over the drawn
      clients does not estimate sum_k p_k Delta_k (sizes [3, 8, 17, 5, 11], C = 4: effective weights
      [.125, .217, .243, .182, .232] against p_k [.068, .182, .386, .114, .25]). Kept for
      comparison with code that samples this way.

    Paper vs. code (FedProx): the paper's Algorithm 2 samples K devices with p_k = n_k / n with
    replacement and averages uniformly, (1/K) sum_k w_k ("size" with weighting="uniform"). The
    official code (litian96/FedProx, `BaseFedarated.select_clients`) samples uniformly without
    replacement, `np.random.choice(range(N), K, replace=False)`, although its docstring says
    "weighted by number of samples", and averages by n_k ("uniform" with weighting="examples").

    "uniform" and "size_distinct" use `lax.top_k` rather than a full permutation: at N = 1,000,000
    and C = 1,000 this is the difference between ~0.03 s and several seconds a round on CPU.
    """
    if scheme == "uniform":
        scores = -jax.random.uniform(key, (num_clients,))
    elif scheme == "size":
        cum = jnp.cumsum(jnp.asarray(client_sizes, jnp.int32))
        draws = jax.random.randint(key, (clients_per_round,), 0, cum[-1])
        return jnp.searchsorted(cum, draws, side="right").astype(jnp.int32)
    elif scheme == "size_distinct":
        p = client_sizes.astype(jnp.float32)
        scores = jnp.log(p / p.sum()) + jax.random.gumbel(key, (num_clients,))
    else:
        raise ValueError(f"sampling scheme must be one of {SCHEMES}, got {scheme!r}")
    return jax.lax.top_k(scores, clients_per_round)[1].astype(jnp.int32)


def first_draw(ids):
    """[C] position of the first occurrence of each ids[c] (identity when the ids are distinct).

    A client drawn twice with replacement is one device: indexing per-draw quantities (straggler
    status, work) with this makes every copy repeat its first draw. O(C log C), one stable sort.
    """
    C = ids.shape[0]
    order = jnp.argsort(ids, stable=True)
    s = ids[order]
    starts = jnp.concatenate([jnp.ones(1, bool), s[1:] != s[:-1]])
    group_start = jax.lax.cummax(jnp.where(starts, jnp.arange(C), 0))
    return jnp.zeros(C, jnp.int32).at[order].set(order[group_start].astype(jnp.int32))


def straggler_steps(key, full_steps, fraction: float, *, unit_steps=None, units: int | None = None,
                    work: str = "code"):
    """Local steps per client when a fraction of them are stragglers (FedProx, Sec. 5.2).

    Exactly round(fraction * C) of the C sampled clients, chosen at random, are stragglers. A
    straggler does a uniformly random integer number k of work units instead of `units` (units =
    local epochs E, or local steps), i.e. k * unit_steps steps (rounded up, at most `full_steps`);
    everyone else does `full_steps`.
      work="code" (default): k in [1, E), the official code's `np.random.randint(1, E)`; with
        E <= 1 there is no smaller amount of work and stragglers do 1 unit.
      work="paper": k in [1, E], the paper's "uniformly random number of epochs between 1 and E".
    Returns (steps [C] int32, is_straggler [C] bool).
    """
    if work not in STRAGGLER_WORK:
        raise ValueError(f"straggler work must be one of {STRAGGLER_WORK}, got {work!r}")
    C = full_steps.shape[0]
    num_stragglers = int(round(fraction * C))
    k_pick, k_units = jax.random.split(key)
    is_straggler = jnp.zeros(C, bool).at[jax.random.permutation(k_pick, C)[:num_stragglers]].set(True)
    high = max(units, 2) if work == "code" else max(units, 1) + 1
    k = jax.random.randint(k_units, (C,), 1, high)
    partial = jnp.minimum(jnp.ceil(k * unit_steps).astype(jnp.int32), full_steps)
    return jnp.where(is_straggler, partial, full_steps).astype(jnp.int32), is_straggler
