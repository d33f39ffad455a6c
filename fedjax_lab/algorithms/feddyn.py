"""FedDyn (Acar, Zhao, Matas, Mattina, Whatmough, Saligrama, ICLR 2021), Algorithm 1.

Server model theta and state h (0 at first); every client k keeps its gradient state
g_k = grad L_k(theta_k^{t-1}) (a row, 0 at first). Round t, participants P_t, m clients in all:

    theta_k^t = argmin_theta L_k(theta) - <g_k, theta> + alpha/2 ||theta - theta^{t-1}||^2
    g_k      <- g_k - alpha (theta_k^t - theta^{t-1})                          (k in P_t)
    h^t       = h^{t-1} - alpha (1/m) sum_{k in P_t} (theta_k^t - theta^{t-1})
    theta^t   = (1/|P_t|) sum_{k in P_t} theta_k^t - h^t / alpha

The argmin is the setup's local work (the paper's experiments: epochs of SGD). Clients send
theta_k^t - theta^{t-1} and receive theta; h stays on the server. Since h = (1/m) sum_k g_k at all
times, a fixed point is a stationary point of sum_k L_k whatever the amount of local work, where
FedAvg's fixed point moves with the local steps under heterogeneous curvature. alpha = 0: the
regularizer vanishes, h stays 0 and h / alpha is taken as 0, so the round is FedAvg's exactly.

Weighting and stragglers. The paper's average over P_t is uniform (`weighting="uniform"`, the
default); with "examples" the mean is weighted by n_k and h moves by alpha |P_t| / m times that
weighted mean. A dropped straggler (drop_stragglers, FedAvg's convention and the default) is not in
P_t: it moves neither h nor its g_k; a kept one counts with its partial work. The server step is
theta^{t-1} + eta_g (mean_P Delta_k - h^t / alpha) by the server optimizer (SGD, lr eta_g = 1: the
paper's rule).

Paper vs. code (alpemreacar/FedDyn, utils_methods.train_FedDyn). The code scales alpha per client,
alpha_k = alpha / (N n_k / n) (the paper's alpha for equal client sizes), keeps -g_k / alpha_k and
sets theta^t = mean_P theta_k + mean_k(-g_k / alpha_k); it reports the accuracy of mean_P theta_k
(the model without the h term) while clients start from theta^t; and it adds weight decay and a
per-round lr decay. Neither the per-client alpha_k nor deploying mean_P theta_k is offered here
(the skeleton's hooks see neither n_k nor the deployed model).
"""
from __future__ import annotations

import jax.numpy as jnp

from fedjax_lab.extend import (Cohort, Optimizer, Setup, defaults, server_averaging, tree_scale,
                               tree_sq_norm, tree_sub, tree_vdot, tree_zeros_like, validate)

FEDDYN = Setup(cohort=Cohort(weighting="uniform"), client_opt=Optimizer("sgd", lr=0.01),
               server_opt=Optimizer("sgd", lr=1.0))


@defaults(FEDDYN)
def feddyn(model, *, alpha: float = 0.01, setup: Setup = Setup()):
    """FedDyn (module docstring); alpha = 0 is FedAvg (uniform weights). alpha may be traced."""
    validate.non_negative("alpha", alpha)

    def local_objective(theta, ctx):              # - <g_k, theta> + alpha/2 ||theta - theta^{t-1}||^2
        return -tree_vdot(ctx.row, theta) + 0.5 * alpha * tree_sq_norm(tree_sub(theta, ctx.w_t))

    def new_row(res, ctx):                        # g_k - alpha (theta_k^t - theta^{t-1})
        return tree_sub(ctx.row, tree_scale(tree_sub(res.params, ctx.w_t), alpha))

    def server_rule(ex, h, num_clients):
        reported = jnp.sum(ex.weights > 0).astype(jnp.float32)
        h = tree_sub(h, tree_scale(ex.direction, alpha * reported / num_clients))
        inv_alpha = jnp.where(alpha > 0, 1.0 / jnp.where(alpha > 0, alpha, 1.0), 0.0)
        return tree_sub(ex.direction, tree_scale(h, inv_alpha)), h

    off = isinstance(alpha, (int, float)) and alpha == 0      # the term is 0: FedAvg's program
    return server_averaging(model, setup, feddyn, local_objective=None if off else local_objective,
                            init_row=tree_zeros_like, new_row=new_row, init_extra=tree_zeros_like,
                            server_rule=server_rule)
