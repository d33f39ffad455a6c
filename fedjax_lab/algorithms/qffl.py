"""q-FFL solved by q-FedAvg (Li, Sanjabi, Beirami, Smith, ICLR 2020), Algorithm 3.

q-FFL minimizes f_q(w) = sum_k p_k/(q+1) F_k^{q+1}(w): a larger q weighs the clients with a larger
loss more, making accuracy across clients more uniform; q = 0 is FedAvg's objective. Round t: each
sampled client k computes F_k(w_t), trains locally from w_t to w_bar_k (the setup's local work)
and sends, with the Lipschitz estimate L,

    Delta_k = F_k^q(w_t) L (w_t - w_bar_k)
    h_k     = q F_k^{q-1}(w_t) ||L (w_t - w_bar_k)||^2 + L F_k^q(w_t)

and the server takes w_{t+1} = w_t - sum_k Delta_k / sum_k h_k. With q = 0, Delta_k = L (w_t -
w_bar_k), h_k = L, so w_{t+1} = mean_k w_bar_k: FedAvg with uniform weights. L = 1/lr as in the
paper's experiments (`lipschitz=None`: 1 / the client lr). The sums are the aggregate of the
messages (Delta, h) under the cohort's weights p_k (our default `weighting="uniform"`: p_k = 1,
the paper's sums; "examples" weighs both sums by n_k). The server optimizer takes the direction
-sum Delta / sum h (SGD at lr 1 by default: the paper's step).

Paper vs. official code (litian96/fair_flearn, qffedavg.py). F_k(w_t): the code evaluates it on the
client's whole training set; here it is the mean loss at w_t over the batches the client draws this
round (`mean_loss`; with `LocalWork(epochs=1)` those batches are one pass over its data, the whole
set). Both add 1e-10 to F_k (so F_k^{q-1} stays finite). The paper samples clients with
probability n_k / n (with replacement, `sampling="size"`), the code without replacement
(`"size_distinct"`); our default is uniform sampling, as for the FedAvg it is compared with.
Measured (experiments/reproduce/qffl.py, Synthetic(1,1), 20 local steps): with L = 1/lr the term
q ||L (w_t - w_bar_k)||^2 / F_k dominates h_k and q = 1 converges far slower than q = 0 (mean and
p10 below FedAvg's after 300 and 2,000 rounds); `lipschitz=1` shows the paper's fairness gain.
"""
from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from fedjax_lab.extend import (Cohort, Optimizer, Setup, defaults, mean_loss, resolve,
                               server_averaging, tree_scale, tree_sq_norm, tree_sub, validate)

QFFL = Setup(cohort=Cohort(weighting="uniform"), client_opt=Optimizer("sgd", lr=0.05),
             server_opt=Optimizer("sgd", lr=1.0))
EPS = 1e-10


@defaults(QFFL)
def qffl(model, *, q: float = 1.0, lipschitz: Optional[float] = None, setup: Setup = Setup()):
    """q-FedAvg (module docstring); q = 0 is FedAvg with uniform weights. q and lipschitz may be
    traced."""
    validate.non_negative("q", q)
    if lipschitz is not None:
        validate.positive("lipschitz", lipschitz)
    s = resolve(setup, qffl)
    L = 1.0 / s.client_opt.lr if lipschitz is None else lipschitz

    def message(res, ctx):
        F = mean_loss(model, ctx.w_t, ctx) + EPS
        g = tree_scale(tree_sub(ctx.w_t, res.params), L)             # L (w_t - w_bar_k)
        Fq = F ** q
        return tree_scale(g, Fq), q * F ** (q - 1) * tree_sq_norm(g) + L * Fq

    def server_rule(ex, extra, num_clients):
        delta, h = ex.direction                                       # sum_p Delta / sum p, ...
        return tree_scale(delta, -jnp.where(h > 0, 1.0 / jnp.where(h > 0, h, 1.0), 0.0)), extra

    return server_averaging(model, s, qffl, message=message, server_rule=server_rule)
