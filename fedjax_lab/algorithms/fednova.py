"""FedNova (Wang, Liu, Liang, Joshi, Poor, NeurIPS 2020): normalized averaging.

Client i takes tau_i local steps from x (its real number of steps: stragglers and epochs over
unequal clients keep their partial work) and ends at y_i; its update is x - y_i = eta G_i a_i,
the gradients G_i weighted by a_i. The server averages the normalized updates and rescales:

    d_i = (x - y_i) / ||a_i||_1
    x  <- x - eta_g tau_eff sum_i p_i d_i,           tau_eff = sum_i p_i ||a_i||_1

p_i = n_i / sum_{j sampled} n_j (`weighting="examples"`), eta_g the server optimizer's lr (SGD,
1). ||a_i||_1 of the local solver (client_optimizer "sgd", constant lr eta):

    SGD                          tau_i
    SGD, momentum rho            [tau_i - rho (1 - rho^tau_i) / (1 - rho)] / (1 - rho)
    SGD + mu/2 ||y - x||^2       [1 - (1 - eta mu)^tau_i] / (eta mu)          (FedProx's local step)

With equal tau_i FedNova is FedAvg. With unequal tau_i FedAvg (keeping partial work) minimizes the
surrogate sum_i p_i ||a_i||_1 F_i / tau_eff; FedNova the objective sum_i p_i F_i (as eta -> 0;
on quadratics both fixed points have closed forms, tests/test_fednova.py).

Paper vs. code (JYWa/FedNova, distoptim/FedNova.py). Momentum: the code's running counter
(c <- rho c + 1, ||a||_1 += c per step) sums to the closed form above: the same numbers.
Proximal: the code adds mu (y - x) after the momentum buffer, so its a_i mixes both; the paper
gives no closed form for both, and here mu > 0 with client momentum is refused. tau_eff: the
paper's is sum p_i ||a_i||_1 (`tau_eff="paper"`, default); with mu > 0 the code takes
sum p_i tau_i (`tau_eff="steps"`). Weight decay: the code adds it to the gradient, which leaves
a_i unchanged (our client optimizer has none). The code's server momentum `gmf` is
server_momentum=gmf with server_lr=1. Clients that took no step send 0 and weigh 0.
"""
from __future__ import annotations

import jax.numpy as jnp

from fedjax_lab.extend import (Optimizer, Setup, defaults, resolve, server_averaging, tree_scale,
                               tree_sq_norm, tree_sub, validate, weighted_mean_scalar)

FEDNOVA = Setup(client_opt=Optimizer("sgd", lr=0.01), server_opt=Optimizer("sgd", lr=1.0))


def a_norm(tau, *, rho=0.0, eta_mu=0.0):
    """||a_i||_1 after tau local steps (module docstring); rho and eta_mu are not both nonzero."""
    tau = jnp.asarray(tau, jnp.float32)
    if isinstance(rho, (int, float)) and rho == 0:
        if isinstance(eta_mu, (int, float)) and eta_mu == 0:
            return tau
        safe = jnp.where(eta_mu > 0, eta_mu, 1.0)
        return jnp.where(eta_mu > 0, (1 - (1 - safe) ** tau) / safe, tau)
    return (tau - rho * (1 - rho ** tau) / (1 - rho)) / (1 - rho)


@defaults(FEDNOVA)
def fednova(model, *, mu: float = 0.0, tau_eff: str = "paper", setup: Setup = Setup()):
    """FedNova (module docstring): local SGD (with momentum, or FedProx's proximal term mu),
    updates normalized by ||a_i||_1, server step scaled by tau_eff ("paper": sum p_i ||a_i||_1,
    "steps": sum p_i tau_i, the official code's choice when mu > 0). Stragglers keep their work."""
    validate.non_negative("mu", mu)
    validate.one_of("tau_eff", tau_eff, {"paper", "steps"})
    s = resolve(setup, fednova)
    opt = s.client_opt
    if opt.name != "sgd" or opt.lr_schedule != "constant":
        raise ValueError(f"client_optimizer must be 'sgd' with a constant lr: FedNova's ||a_i||_1 "
                         f"is that of local SGD, got {opt.name!r} with schedule {opt.lr_schedule!r}")
    rho = opt.momentum
    if isinstance(rho, (int, float)) and rho >= 1:
        raise ValueError(f"client_momentum must be < 1 for FedNova's ||a_i||_1, got {rho}")
    if not (isinstance(mu, (int, float)) and mu == 0) and not (
            isinstance(rho, (int, float)) and rho == 0):
        raise ValueError(f"mu = {mu} with client_momentum = {rho}: FedNova's ||a_i||_1 has no "
                         "closed form for both; use one of them")
    norm = lambda tau: a_norm(tau, rho=rho, eta_mu=opt.lr * mu)

    def message(res, ctx):                        # -d_i = (y_i - x) / ||a_i||_1
        a = norm(res.num_steps)
        return tree_scale(tree_sub(res.params, ctx.w_t), 1.0 / jnp.where(a > 0, a, 1.0))

    def server_rule(ex, extra, num_clients):
        work = norm(ex.num_steps) if tau_eff == "paper" else ex.num_steps.astype(jnp.float32)
        return tree_scale(ex.direction, weighted_mean_scalar(work, ex.weights)), extra

    prox = None if isinstance(mu, (int, float)) and mu == 0 else (
        lambda w, ctx: 0.5 * mu * tree_sq_norm(tree_sub(w, ctx.w_t)))
    return server_averaging(model, s, fednova, drop_stragglers=False, local_objective=prox,
                            message=message, server_rule=server_rule)
