"""pFedMe (T. Dinh, Tran, Nguyen, "Personalized Federated Learning with Moreau Envelopes",
NeurIPS 2020, Algorithm 1).

Client i's personalized model theta_i approximately minimizes f_i(theta) + lam/2 ||theta - w_i||^2
(the Moreau envelope F_i(w_i) of f_i). Round t, sampled client i starts from w_{i,0} = w^t and
takes R local steps r = 0..R-1, each on one batch D_{i,r}:

    theta~_i <- K steps of GD on f_i(theta; D_{i,r}) + lam/2 ||theta - w_{i,r}||^2, from w_{i,r}
                (step size personal_lr)
    w_{i,r+1} = w_{i,r} - eta lam (w_{i,r} - theta~_i)              eta: the client optimizer's lr
    server:     w^{t+1} = (1 - beta) w^t + beta sum_i p_i w_{i,R}      (beta = 1: plain averaging)

lam (w_{i,r} - theta~_i) is the gradient of the Moreau envelope at w_{i,r}, so the w step is local
training (with the setup's client optimizer) on the loss f_i(theta~) + lam/2 ||theta~ - w||^2 with
theta~ held fixed. The client's theta_i is the theta~ of its last real step (a row; clients deploy
it: client_params, the paper's "pFedMe (PM)"); `global_params` is w^t ("pFedMe (GM)"). beta
multiplies the averaged update before the server optimizer (SGD, lr 1 by default).

Paper vs. code (CharlieDinh/pFedMe, userpFedMe.py): the code's inner solver warm-starts theta from
the previous local step's theta (its optimizer steps the same tensors) and sets theta = w^t at the
start of each round; the paper leaves the starting point open; here theta starts from w_{i,r} at
every local step. The paper averages over the sampled clients uniformly while every client
computes; the code weights by train samples (our default `weighting="examples"`; `--weighting
uniform` for the paper's) and here only the sampled clients train. Rows of clients that did not
train keep their theta_i (w^0 before their first round).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fedjax_lab.extend import (RowRound, ServerRound, Setup, batch_loss, defaults, local_train,
                               resolve, row_algorithm, tree_scale, tree_sq_norm, tree_sub,
                               tree_where, validate)


NO_HYPERGRAD = {"*": "theta~ (the inner GD's solution) enters the envelope step through a "
                     "stop_gradient, so every path to the trained model is cut at it"}


@defaults(Setup(), no_hypergrad=NO_HYPERGRAD)
def pfedme(model, *, lam: float = 15.0, inner_steps: int = 5, personal_lr: float = 0.05,
           beta: float = 1.0, setup: Setup = Setup()):
    """pFedMe (module docstring): lam, personal_lr and beta may be traced."""
    validate.positive("lam", lam)
    validate.positive("inner_steps", inner_steps, integer=True)
    validate.positive("personal_lr", personal_lr)
    validate.positive("beta", beta)
    s = resolve(setup, pfedme, drop_stragglers=True)
    f = lambda p, xb, yb, rng: batch_loss(model, p, xb, yb, rng, train=True)

    def theta_tilde(w, xb, yb, rng):
        """K GD steps on f(theta; batch) + lam/2 ||theta - w||^2 from theta = w (w held fixed)."""
        w = jax.lax.stop_gradient(w)
        h = lambda th: f(th, xb, yb, rng) + 0.5 * lam * tree_sq_norm(tree_sub(th, w))
        step = lambda th, _: (jax.tree.map(lambda a, g: a - personal_lr * g, th, jax.grad(h)(th)),
                              None)
        return jax.lax.stop_gradient(jax.lax.scan(step, w, None, length=inner_steps)[0])

    def envelope(w, xb, yb, rng):
        th = theta_tilde(w, xb, yb, rng)
        return f(th, xb, yb, rng) + 0.5 * lam * tree_sq_norm(tree_sub(th, w))

    train = local_train(model, s.client_opt.build("client_optimizer"), loss_fn=envelope,
                        step_stats=lambda w, xb, yb, rng, last: tree_scale(
                            theta_tilde(w, xb, yb, rng), last))

    def client(w_t, x, y, idx, step_mask, key):
        steps = jnp.arange(step_mask.shape[0])
        last = jnp.max(jnp.where(step_mask, steps, -1))
        res = train(w_t, x, y, idx, step_mask, key, step_inputs=(steps == last).astype(jnp.float32))
        return (tree_sub(res.params, w_t), res.stats), res.loss, res.objective

    rnd = ServerRound(model, s, client=client, send=lambda messages: messages[0],
                      server_rule=lambda ex, extra, n: (tree_scale(ex.direction, beta), extra))

    def step(server, rows, ids, data, key):
        part, rows, data, (k_train,) = rnd.begin_rows(key, data, ids, rows)
        server, metrics, ex = rnd.step_with_exchange(server, data, part, k_train=k_train, key=key)
        trained = part.batches.num_steps > 0
        new_rows = jax.vmap(tree_where)(trained, ex.messages[1], rows)
        return server, rnd.end_rows(new_rows, ids), metrics

    spec = RowRound(init_server=rnd.init, init_row=lambda server: server.params,
                    sample=rnd.sample, step=step, params=lambda server, rows: rows)
    alg = row_algorithm(spec, model=model, global_params=lambda st: st.params,
                        check=rnd.check)
    return dataclasses.replace(alg, setup=s)
