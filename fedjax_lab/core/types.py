"""The two records everything is built on: Model and Algorithm.

Both are frozen dataclasses compared by identity, so a jitted driver can take them as static
arguments and compile once per (algorithm, shapes), however many rounds or `run` calls follow.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

Params = Any
PRNGKey = jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """Pure functions over a params pytree.

    init(key, sample_x) -> params
    apply(params, x, *, train=False, rng=None) -> logits
    features(params, x, *, train=False, rng=None) -> z and head(params, z) -> logits, where the split
    is meaningful (apply == head o features).
    loss(logits, y) -> per-example loss (softmax cross-entropy with integer labels by default).
    update_state(params, new_params, x, rng) -> new_params with the model's non-trainable state
    (BatchNorm's running statistics, which live in params["batch_stats"]) taken from a train-mode
    forward pass of `params` on x; None for a model without state. Local training calls it after
    every optimizer step, so the state is carried, averaged and personalized like any parameter;
    its gradient is zero (a train-mode forward pass does not read it).
    """
    init: Callable[..., Params]
    apply: Callable[..., jax.Array]
    features: Optional[Callable[..., jax.Array]] = None
    head: Optional[Callable[..., jax.Array]] = None
    loss: Callable[[jax.Array, jax.Array], jax.Array] = None  # type: ignore[assignment]
    name: str = "model"
    update_state: Optional[Callable] = None

    def __post_init__(self):
        if self.loss is None:
            object.__setattr__(self, "loss", cross_entropy)


def cross_entropy(logits, y):
    """Softmax cross-entropy with integer labels, -log softmax(logits)[y], the same numbers as
    optax.softmax_cross_entropy_with_integer_labels. The label's entry is picked by a select over
    the classes rather than a gather, so that its gradient is elementwise where the gather's is a
    scatter-add (XLA:CPU, the logistic FedAvg round at C = 1000: ~15% faster, experiments/PERF.md)."""
    shifted = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    picked = jnp.sum(jnp.where(jnp.arange(logits.shape[-1]) == y[..., None], shifted, 0.0), axis=-1)
    return jnp.log(jnp.sum(jnp.exp(shifted), axis=-1)) - picked


def batch_loss(model: Model, params, x, y, rng=None, *, train=True):
    """Mean loss of `model` on one batch."""
    return jnp.mean(model.loss(model.apply(params, x, train=train, rng=rng), y))


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class Algorithm:
    """An algorithm is an immutable record of pure functions (in the spirit of optax):

    state = alg.init(key, data)                 # server state + stacked per-client rows [N, ...]
    state, metrics = alg.round(state, data, key)  # pure and jittable: sample, train, aggregate
    params = alg.client_params(state, ids)      # what clients `ids` deploy, stacked [len(ids), ...]
    params = alg.global_params(state)           # the global model (None for purely personal methods)

    `check(data)` raises ValueError on bad hyperparameters for this data, before any compilation;
    `config` holds the factory's hyperparameters (written to config.json and checkpoints).
    `setup` is the resolved `Setup` (cohort, local work, optimizers, ...) it runs with.
    `name` and `config` are stamped by the factory's `defaults` (core/setup.py) from its call.
    """
    name: str = ""
    init: Callable[[PRNGKey, Any], Any]
    round: Callable[[Any, Any, PRNGKey], tuple[Any, dict]]
    client_params: Callable[[Any, jax.Array], Params]
    model: Model
    global_params: Optional[Callable[[Any], Params]] = None
    personalized: bool = False
    check: Callable[[Any], None] = lambda data: None
    config: dict = dataclasses.field(default_factory=dict)
    setup: Any = None         # the resolved core.setup.Setup the algorithm was built with
    server_round: Any = None  # the core.skeleton.ServerRound it is built from, if any
