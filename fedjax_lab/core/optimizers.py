"""Named optimizers, so factories (and the CLI derived from their signatures) take plain scalars
and strings; an optax.GradientTransformation passes through unchanged.

"fedadam", "fedyogi" and "fedadagrad" are the server rules of Reddi et al. (ICLR 2021), Algorithm 2,
on the pseudo-gradient g_t = -Delta_t that `core.rounds.server_update` hands the optimizer:

    m_t = b1 m_{t-1} + (1 - b1) g_t                                m_{-1} = 0
    v_t = v_{t-1} + g_t^2                                          (Adagrad)
    v_t = v_{t-1} - (1 - b2) g_t^2 sign(v_{t-1} - g_t^2)           (Yogi)
    v_t = b2 v_{t-1} + (1 - b2) g_t^2                              (Adam)
    w_{t+1} = w_t - lr m_t / (sqrt(v_t) + tau)                     v_{-1} = tau^2, tau = eps

i.e. w_{t+1} = w_t + lr m'_t / (sqrt(v_t) + tau) with m'_t the paper's momentum of Delta_t.

Paper vs. optax: optax's Adam and Yogi divide m and v by (1 - b^t) (bias correction) and start
Yogi's m and v at 1e-6; optax's Adagrad has no momentum, starts the accumulator at 0.1 and puts
eps inside the root (g / sqrt(v + eps)). The paper has none of these. With lr = 0.01 the first
Adagrad step for Delta = (0.01, 0.001, 0.1) is (9.0e-4, 4.1e-4, 9.9e-4) by the paper and
(3.1e-4, 3.1e-5, 3.0e-3) by optax. optax's rules keep their usual names "adam", "yogi" and
"adagrad" (Kingma & Ba's bias-corrected Adam is what a client optimizer "adam" should mean).

A name means the same rule wherever it is used: the paper's rules are named after the paper's
algorithms, so `server_optimizer="fedadam"` is FedAdam and "adam" is optax's Adam on either side.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.core import validate
from fedjax_lab.core.values import is_traced

OPTIMIZERS = {
    "sgd": "plain SGD (with momentum when momentum > 0)",
    "fedadam": "Reddi et al.'s FedAdam rule: b1 momentum, v = b2 v + (1-b2) g^2 from v = tau^2, "
               "step lr m / (sqrt(v) + tau), no bias correction; tau is eps",
    "fedyogi": "Reddi et al.'s FedYogi rule: as fedadam with v -= (1-b2) g^2 sign(v - g^2)",
    "fedadagrad": "Reddi et al.'s FedAdagrad rule: as fedadam with v += g^2 (b1 momentum, no b2)",
    "adam": "optax.adam: Kingma & Ba, bias-corrected, lr m^ / (sqrt(v^) + eps)",
    "yogi": "optax.yogi: bias-corrected Yogi, m and v start at 1e-6",
    "adagrad": "optax.adagrad: no momentum, accumulator starts at 0.1, lr g / sqrt(v + eps)",
}

_SECOND_MOMENT = {   # v_t from v_{t-1} and g_t^2, Reddi et al. Algorithm 2
    "fedadagrad": lambda v, g2, b2: v + g2,
    "fedyogi": lambda v, g2, b2: v - (1 - b2) * g2 * jnp.sign(v - g2),
    "fedadam": lambda v, g2, b2: b2 * v + (1 - b2) * g2,
}


class ScaleByReddiState(NamedTuple):
    m: optax.Params
    v: optax.Params


def scale_by_reddi(rule: str, *, b1: float = 0.9, b2: float = 0.99,
                   tau: float = 1e-3) -> optax.GradientTransformation:
    """g -> m_t / (sqrt(v_t) + tau), Reddi et al. Algorithm 2 (module docstring); rule picks v_t."""
    second_moment = _SECOND_MOMENT[rule]

    def init(params):
        return ScaleByReddiState(m=jax.tree.map(jnp.zeros_like, params),
                                 v=jax.tree.map(lambda p: jnp.full_like(p, tau ** 2), params))

    def update(updates, state, params=None):
        del params
        m = jax.tree.map(lambda g, m: b1 * m + (1 - b1) * g, updates, state.m)
        v = jax.tree.map(lambda g, v: second_moment(v, g * g, b2), updates, state.v)
        out = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + tau), m, v)
        return out, ScaleByReddiState(m=m, v=v)

    return optax.GradientTransformation(init, update)


def reddi(rule: str, lr, *, b1: float = 0.9, b2: float = 0.99,
          tau: float = 1e-3) -> optax.GradientTransformation:
    """FedAdagrad / FedYogi / FedAdam's server optimizer: w <- w - lr m_t / (sqrt(v_t) + tau)."""
    return optax.chain(scale_by_reddi(rule, b1=b1, b2=b2, tau=tau),
                       optax.scale_by_learning_rate(lr))


SCHEDULES = {"constant": "lr at every step",
             "inv_sqrt": "lr / sqrt(t + 1) at step t = 0, 1, ... (Chen et al. 2020's decay)"}


def schedule(lr, name: str = "constant"):
    """The learning rate as an optax schedule (a plain lr when constant)."""
    if name == "constant":
        return lr
    return lambda t: lr / jnp.sqrt(t + 1.0)


def make_optimizer(name_or_tx, lr: float, *, momentum: float = 0.0, eps: float = 1e-3,
                   b1: float = 0.9, b2: float = 0.99, lr_schedule: str = "constant",
                   arg: str = "optimizer"):
    """OPTIMIZERS[name] with learning rate lr (under SCHEDULES[lr_schedule]); eps is Reddi et
    al.'s tau for the paper's rules.

    `arg` ("client_optimizer", "server_optimizer") names the arguments in error messages.
    """
    if isinstance(name_or_tx, optax.GradientTransformation):
        return name_or_tx
    validate.one_of(arg, name_or_tx, OPTIMIZERS)
    named = lambda what: arg.replace("optimizer", what)
    validate.positive(named("lr"), lr)
    validate.non_negative(named("momentum"), momentum)
    validate.positive(named("eps"), eps)
    validate.fraction(named("b1"), b1, closed_right=False)
    validate.fraction(named("b2"), b2, closed_right=False)
    validate.one_of(named("lr_schedule"), lr_schedule, SCHEDULES)
    lr = schedule(lr, lr_schedule)
    if name_or_tx == "sgd":
        plain = not is_traced(momentum) and momentum == 0     # a swept momentum stays traced
        return optax.sgd(lr, momentum=None if plain else momentum)
    if name_or_tx in _SECOND_MOMENT:
        return reddi(name_or_tx, lr, b1=b1, b2=b2, tau=eps)
    if name_or_tx == "adam":
        return optax.adam(lr, b1=b1, b2=b2, eps=eps)
    if name_or_tx == "yogi":
        return optax.yogi(lr, b1=b1, b2=b2, eps=eps)
    return optax.adagrad(lr, eps=eps)
