"""MOON, model-contrastive federated learning (Li, He, Song, CVPR 2021), Algorithm 1.

Round t: client i starts from w_i = w_t and trains on each batch with

    l = l_sup(w_i; x, y) + mu * l_con,
    l_con = -log( exp(sim(z, z_glob)/tau) / (exp(sim(z, z_glob)/tau) + exp(sim(z, z_prev)/tau)) )

z = R_{w_i}(x) the representation of the model being trained, z_glob = R_{w_t}(x) of the global
model (fixed in the round), z_prev = R_{w_i^{t-1}}(x) of the client's previous local model (a
per-client row, rewritten with w_i after the round; a client that does not report keeps it), sim
the cosine similarity; the server averages the w_i as FedAvg does. mu = 0 is FedAvg.

R is the model's `features` (the representation before the head): the paper puts a 2-layer
projection head on the base encoder (out_dim 256), we use the model's own split; a model without
`features`, or whose features do not depend on its parameters (logistic), is refused. tau = 0.5 as
in the paper; mu: the paper uses 5 (CIFAR-10) and 1 (CIFAR-100, Tiny-ImageNet). Our default is
mu = 1: on digits (Dirichlet 0.3 and 0.1, mlp 64-64, 40 rounds) mu = 5 cost 2-7 points against
FedAvg (0.898 / 0.867 vs 0.923 / 0.942), mu = 1 about one (0.914 / 0.928); no mu beat FedAvg there
(experiments/reproduce/moon.py measures the claim).

Paper vs. official code (QinbinLi/MOON). w_i^{-1} is undefined in the paper. Here every client's
previous model starts as w_0, so round 1 is FedAvg's (z_prev = z_glob: l_con = log 2 with zero
gradient) and a client's first participation pushes away from w_0. The code has no negative in its
first round (its pool of previous models is empty: l_con = 0) and afterwards takes the previous
model from a copy of every party's net, so a client not yet sampled contrasts with its own random
initialization (drawn separately from w_0). The code trains with SGD lr 0.01, momentum 0.9, weight
decay 1e-5 (our default: plain SGD at lr 0.05; `client_momentum` is a Setup flag) and keeps
`model_buffer_size` = 1 previous model, as we do.
cos is torch's with eps 1e-8 on each norm here (torch clamps the product).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_lab.extend import Optimizer, Setup, defaults, server_averaging, validate

MOON = Setup(client_opt=Optimizer("sgd", lr=0.05), server_opt=Optimizer("sgd", lr=1.0))


def cosine(a, b, eps: float = 1e-8):
    """Row-wise cosine similarity of [B, d] arrays (0 gradient, not NaN, at a zero row)."""
    norm = lambda v: jnp.sqrt(jnp.maximum(jnp.sum(v * v, axis=-1), eps * eps))
    return jnp.sum(a * b, axis=-1) / (norm(a) * norm(b))


def contrastive_loss(z, z_glob, z_prev, tau):
    """l_con averaged over the batch: cross entropy of the logits [sim(z, z_glob), sim(z, z_prev)]
    / tau with the positive (global) pair as the label."""
    logits = jnp.stack([cosine(z, z_glob), cosine(z, z_prev)], axis=-1) / tau
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[:, 0])


NO_HYPERGRAD = {"*": "the registry check measured dL/dmu 0.00083 by reverse mode against 0.037 +- "
                     "0.005 by central differences at the defaults, unexplained"}


@defaults(MOON, model="mlp", no_hypergrad=NO_HYPERGRAD)
def moon(model, *, mu: float = 1.0, tau: float = 0.5, setup: Setup = Setup()):
    """MOON (module docstring): local loss CE + mu * l_con; mu = 0 is FedAvg. mu, tau may be
    traced."""
    validate.non_negative("mu", mu)
    validate.positive("tau", tau)
    if getattr(model, "features", None) is None:
        raise ValueError(f"model {getattr(model, 'name', model)!r} has no features(params, x): "
                         "MOON contrasts the representations R_w(x) of the local, global and "
                         "previous models (use e.g. models.mlp or models.cnn)")
    if getattr(model, "name", None) == "logistic":
        raise ValueError("model 'logistic': its features are the raw input (no parameters), so "
                         "l_con is constant and MOON would be FedAvg; use e.g. models.mlp")

    def batch_objective(w, xb, yb, rng, ctx):
        # z_glob and z_prev are fixed in local training (its gradient is in w only); no
        # stop_gradient, so fl.hypergrad sees how w_t and the row shape the round
        z = model.features(w, xb, train=True, rng=rng)
        return mu * contrastive_loss(z, model.features(ctx.w_t, xb), model.features(ctx.row, xb), tau)

    return server_averaging(model, setup, moon, batch_objective=batch_objective,
                            init_row=lambda params: params,
                            new_row=lambda res, ctx: res.params)
