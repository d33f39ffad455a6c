"""APFL (Deng, Kamani, Mahdavi, "Adaptive Personalized Federated Learning", arXiv:2003.13461,
2020, Algorithm 1).

Client i keeps a local model v_i and a mixing weight alpha_i in [0, 1] (its row); its personalized
model is v_bar_i = alpha_i v_i + (1 - alpha_i) w. Round t, sampled client i starts its copy of
the global model from w_i = w^t and takes, at each local step on one batch xi (all from the
step's old values, with the client's step size eta):

    w_i     <- w_i - eta grad f_i(w_i; xi)                              the global copy (FedAvg's)
    v_i     <- v_i - eta alpha_i grad f_i(v_bar_i; xi)                  grad_v f_i(v_bar_i)
    alpha_i <- alpha_i - eta <v_i - w_i, grad f_i(v_bar_i; xi)>         grad_alpha f_i(v_bar_i)
    v_bar_i  = alpha_i v_i + (1 - alpha_i) w_i
    server:  w^{t+1} = the average of the w_i (FedAvg: n_k weights, the setup's server step)

alpha_i is projected onto [0, 1] after each step (the constraint of the paper's problem (3)).
`adaptive_alpha=False` keeps alpha_i = alpha fixed; alpha = 0 then is FedAvg (the ablation: the
global model bit for bit, and every client deploys it). Clients deploy v_bar_i with the current
global model, alpha_i v_i + (1 - alpha_i) w^t (client_params); `global_params` is w^t.

How it runs: the global copies' training and aggregation are FedAvg's round skeleton (so the
setup's aggregator, attack, uplink and server optimizer act on w); the personal half trains the
triple (w_i, v_i, alpha_i) with one local training on the same batches and step mask, by the
client optimizer on the loss f_i(w) + f_i(alpha v + (1 - alpha) stop_gradient(w)), whose
gradients are exactly the three of Algorithm 1 (w's copy is trained twice: the skeleton has no
hook for a client that trains more than the model's params and also keeps rows). Stragglers keep
their partial personal work (their w_i may be dropped from the average, as FedAvg does).

Initial alpha: v_i starts at w^0 and lags w_i in a round's first steps, so alpha_i first falls;
and alpha_i = 0 is a fixed point (v_i's gradient alpha_i grad f_i vanishes, v_i freezes). Started
at 0.25 on 2-label digits clients, alpha_i reaches ~0 within 10 rounds (personalized = FedAvg);
from 0.5 it settles near 0.35, from 0.75 it rises to 0.82. Default alpha = 0.5.

Paper vs. code: PFLlib's clientapfl adds 0.02 alpha to the alpha gradient and clips alpha to
[0, 1] once per batch; the paper's rule has no such term (not added here).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.extend import (RowRound, Setup, batch_loss, client_keys, defaults, local_train,
                               row_algorithm, server_averaging, weighted_mean_scalar,
                               validate)


def project_alpha(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` on {"w", "v", "alpha"}, then alpha's new value clipped to [0, 1]."""
    def update(grads, state, params):
        u, state = tx.update(grads, state, params)
        a = params["alpha"]
        return {**u, "alpha": jnp.clip(a + u["alpha"], 0.0, 1.0) - a}, state
    return optax.GradientTransformation(tx.init, update)


NO_HYPERGRAD = {"*": "v_bar mixes stop_gradient(w) (so that w's step is grad f(w) alone), which "
                     "cuts the derivative of v's and alpha's steps with respect to w"}


@defaults(Setup(), no_hypergrad=NO_HYPERGRAD)
def apfl(model, *, alpha: float = 0.5, adaptive_alpha: bool = True, setup: Setup = Setup()):
    """APFL (module docstring); alpha: every alpha_i's initial value (adaptive_alpha=False:
    its fixed value)."""
    validate.fraction("alpha", alpha)
    validate.one_of("adaptive_alpha", adaptive_alpha, {True, False})
    base = server_averaging(model, setup, apfl)
    rnd = base.server_round
    s = rnd.setup
    f = lambda p, xb, yb, rng: batch_loss(model, p, xb, yb, rng, train=True)

    def mixed(p):
        return jax.tree.map(lambda v, w: p["alpha"] * v + (1 - p["alpha"]) * w, p["v"],
                            jax.lax.stop_gradient(p["w"]))

    tx = s.client_opt.build("client_optimizer")
    if adaptive_alpha:
        tx = project_alpha(optax.multi_transform(
            {"train": tx, "alpha": s.client_opt.build("client_optimizer")},
            lambda p: {"w": jax.tree.map(lambda _: "train", p["w"]),
                       "v": jax.tree.map(lambda _: "train", p["v"]), "alpha": "alpha"}))
    else:
        tx = optax.multi_transform(
            {"train": tx, "alpha": optax.set_to_zero()},
            lambda p: {"w": jax.tree.map(lambda _: "train", p["w"]),
                       "v": jax.tree.map(lambda _: "train", p["v"]), "alpha": "alpha"})
    personal = local_train(model, tx, loss_fn=lambda p, xb, yb, rng: f(mixed(p), xb, yb, rng),
                           extra_batch_loss=lambda p, xb, yb, rng, anchor: f(p["w"], xb, yb, rng))

    def step(server, rows, ids, data, key):
        part, rows, data, (k_train,) = rnd.begin_rows(key, data, ids, rows)
        start = {"w": server.params, "v": rows["v"], "alpha": rows["alpha"]}
        res = jax.vmap(personal, in_axes=({"w": None, "v": 0, "alpha": 0}, None, None, 0, 0, 0))(
            start, data.x, data.y, part.batches.idx, part.batches.step_mask,
            client_keys(k_train, part.ids))
        server, metrics = rnd.step(server, data, part, k_train=k_train, key=key)
        real = part.valid.astype(jnp.float32) if part.valid is not None else \
            jnp.ones(part.ids.shape, jnp.float32)
        new_rows = {"v": res.params["v"], "alpha": res.params["alpha"]}
        metrics.update(personal_loss=weighted_mean_scalar(res.loss, real),
                       mean_alpha=weighted_mean_scalar(new_rows["alpha"], real))
        return server, rnd.end_rows(new_rows, ids), metrics

    def deploy(server, rows):
        a = rows["alpha"]
        return jax.tree.map(lambda v, w: a.reshape((-1,) + (1,) * w.ndim) * v
                            + (1 - a.reshape((-1,) + (1,) * w.ndim)) * w, rows["v"], server.params)

    spec = RowRound(init_server=rnd.init,
                    init_row=lambda server: {"v": server.params,
                                             "alpha": jnp.asarray(alpha, jnp.float32)},
                    sample=rnd.sample, step=step, params=deploy)
    alg = row_algorithm(spec, model=model, global_params=lambda st: st.params,
                        check=rnd.check, config=base.config)
    return dataclasses.replace(alg, setup=s)
