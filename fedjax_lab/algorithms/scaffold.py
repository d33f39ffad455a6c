"""SCAFFOLD (Karimireddy, Kale, Mohri, Reddi, Stich, Suresh, ICML 2020), Algorithm 1.

Server state x and control variate c; every client i keeps its control variate c_i (a row, 0 at
first). Round t, sampled clients S, client i starts from y_i = x and takes K local steps

    y_i <- y_i - eta_l (g_i(y_i) - c_i + c)
    c_i+ = g_i(x)                                        option I  (a gradient at x)
    c_i+ = c_i - c + (x - y_i) / (K eta_l)               option II (the default, cheaper)

and sends (Delta y_i, Delta c_i) = (y_i - x, c_i+ - c_i). The server takes

    x <- x + eta_g mean_S Delta y_i,      c <- c + (|S| / N) mean_S Delta c_i

eta_g is the server optimizer's lr (SGD, lr 1 by default). The correction c - c_i is the
gradient of the local objective's term <c - c_i, y>; with `control_variates=False` c and c_i stay
0 and the round is FedAvg's, bit for bit. Clients send twice the model and receive x and c.

Paper vs. code. Option I's g_i(x) is, in the paper, "a (possibly larger) batch" gradient at x; here
it is the mean gradient at x over the batches the client drew this round (eval mode). K_i is the
number of steps client i really took (a straggler's K_i is its own, so option II stays the
paper's formula for partial work); clients that do not report (dropped stragglers) keep c_i.
The paper averages uniformly over S (our default `weighting="uniform"`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_lab.extend import (Cohort, Optimizer, Setup, defaults, mean_loss, resolve,
                               server_averaging, tree_add, tree_scale, tree_sub, tree_vdot,
                               tree_zeros_like, validate)

# client lr 0.05: 20 local steps then drift on a two-class split (experiments/reproduce/scaffold.py)
SCAFFOLD = Setup(cohort=Cohort(weighting="uniform"), client_opt=Optimizer("sgd", lr=0.05),
                 server_opt=Optimizer("sgd", lr=1.0))


@defaults(SCAFFOLD)
def scaffold(model, *, option: str = "II", control_variates: bool = True,
             setup: Setup = Setup()):
    """SCAFFOLD (module docstring); option "I" or "II" picks the control-variate update;
    control_variates=False is the ablation (FedAvg)."""
    validate.one_of("option", option, {"I", "II"})
    validate.one_of("control_variates", control_variates, {True, False})
    s = resolve(setup, scaffold)
    opt = s.client_opt
    if (opt.name, opt.momentum, opt.lr_schedule) != ("sgd", 0.0, "constant"):
        raise ValueError(f"client_optimizer must be plain 'sgd' (momentum 0, constant lr): "
                         f"SCAFFOLD's local step is y - eta_l (g - c_i + c), got {opt.name!r} with "
                         f"momentum {opt.momentum} and schedule {opt.lr_schedule!r}")
    eta_l = opt.lr
    if not control_variates:
        return server_averaging(model, s, scaffold)

    def c_plus(res, ctx):
        if option == "I":
            return jax.grad(lambda w: mean_loss(model, w, ctx))(ctx.w_t)
        K = jnp.maximum(res.num_steps, 1).astype(jnp.float32)
        return jax.tree.map(lambda c_i, c, x, y: c_i - c + (x - y) / (K * eta_l),
                            ctx.row, ctx.extra, ctx.w_t, res.params)

    def server_rule(ex, c, num_clients):
        delta_y, delta_c = ex.direction
        reported = jnp.sum(ex.weights > 0).astype(jnp.float32)
        return delta_y, tree_add(c, tree_scale(delta_c, reported / num_clients))

    return server_averaging(
        model, s, scaffold,
        local_objective=lambda y, ctx: tree_vdot(tree_sub(ctx.extra, ctx.row), y),
        message=lambda res, ctx: (tree_sub(res.params, ctx.w_t), tree_sub(c_plus(res, ctx),
                                                                          ctx.row)),
        init_row=tree_zeros_like, new_row=c_plus,
        init_extra=tree_zeros_like, server_rule=server_rule, send_extra=True)
