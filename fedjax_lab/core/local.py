"""Local training, written once: a `lax.scan` over a client's steps with an optax optimizer.

    w_{s+1} = w_s + opt.update(grad L(w_s; batch_s, s))     where step_mask[s] is True
    w_{s+1} = w_s, opt_state unchanged                          where it is False

L(w; batch) = mean example loss of the model + extra_loss(w) (e.g. FedProx's mu/2 ||w - w_t||^2).
Masked steps leave params *and* optimizer state untouched, so variable local work (stragglers,
epochs over unequal clients) is a mask, never a Python branch.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.core.tree import tree_where
from fedjax_lab.core.types import Model, batch_loss


class LocalResult(NamedTuple):
    params: object
    opt_state: object
    loss: jax.Array       # mean training loss over the real steps (0 when there were none)
    num_steps: jax.Array  # number of real steps taken


def local_train(model: Model, optimizer: optax.GradientTransformation, *,
                extra_loss: Optional[Callable] = None, loss_fn: Optional[Callable] = None):
    """Returns train(params, x, y, idx [S, B], step_mask [S], key, opt_state=None) -> LocalResult.

    `x`, `y` are the flat federated arrays; the step's batch is gathered inside the scan, so the
    [C, S, B, ...] batch tensor is never materialized. `loss_fn(params, xb, yb, rng)` replaces the
    model's loss entirely (meta-learning, distillation); `extra_loss(params)` is added to it.
    """
    base = loss_fn or (lambda p, xb, yb, rng: batch_loss(model, p, xb, yb, rng, train=True))
    total = base if extra_loss is None else (lambda p, xb, yb, rng: base(p, xb, yb, rng) + extra_loss(p))
    grad_fn = jax.value_and_grad(total)

    def train(params, x, y, idx, step_mask, key, opt_state=None) -> LocalResult:
        if opt_state is None:
            opt_state = optimizer.init(params)

        def step(carry, inp):
            params, opt_state = carry
            rows, active, s = inp
            loss, g = grad_fn(params, x[rows], y[rows], jax.random.fold_in(key, s))
            updates, new_opt_state = optimizer.update(g, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            carry = (tree_where(active, new_params, params), tree_where(active, new_opt_state, opt_state))
            return carry, jnp.where(active, loss, 0.0)

        steps = jnp.arange(idx.shape[0])
        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), (idx, step_mask, steps))
        n = jnp.sum(step_mask)
        return LocalResult(params, opt_state, jnp.sum(losses) / jnp.maximum(n, 1), n)

    return train
