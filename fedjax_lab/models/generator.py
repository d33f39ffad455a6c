"""FedGen's lightweight conditional generator G_w(eps, y) -> z in a model's feature space
(Zhu, Hong, Zhou, ICML 2021, Sec. 3.2; used by algorithms/fedgen.py):

    z = W_2 relu(W_1 [eps, onehot(y)] + b_1) + b_2,     eps ~ N(0, I_d) (paper) or U[0, 1)^d (code)

A pair of pure functions over a params pytree, like `Model`: `init(key) -> params` and
`apply(params, eps, y) -> z [B, latent_dim]` (algorithms/fedgen.draw draws y and eps).
`latent_dim` must equal the size of the representation the head takes (`model.features`'s output).

Paper vs. official code (zhuangdizhu/FedGen, trainmodel/generator.py, "mnist" config: hidden 256,
latent 32, noise 32): the code puts a BatchNorm1d between the two layers, in training mode on the
server and in eval mode (running statistics) on the users; we leave it out, so G has no batch
statistics to carry and users and server see the same function. The code draws eps with
`torch.rand` (U[0, 1), though its comment says Gaussian): fedgen's `noise="uniform"`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_lab.core import validate
from fedjax_lab.models.base import Dense

NOISE_KINDS = ("normal", "uniform")


class _ConditionalMLP(nn.Module):
    latent_dim: int
    num_classes: int
    hidden: int

    @nn.compact
    def __call__(self, eps, y):
        h = jnp.concatenate([eps, jax.nn.one_hot(y, self.num_classes, dtype=eps.dtype)], axis=-1)
        h = nn.relu(Dense(self.hidden, name="hidden")(h))
        return Dense(self.latent_dim, name="representation")(h)


@dataclasses.dataclass(frozen=True, eq=False)
class Generator:
    """G_w(eps, y): init(key) -> params, apply(params, eps [B, noise_dim], y [B]) -> z [B, latent_dim]."""
    init: Callable
    apply: Callable
    latent_dim: int
    num_classes: int
    noise_dim: int
    hidden: int
    name: str = "generator"


def generator(latent_dim: int, num_classes: int, *, noise_dim: int = 32,
              hidden: int = 256) -> Generator:
    """The two-layer conditional generator of the module docstring (the code's MNIST sizes by
    default: noise 32, hidden 256); (noise_dim + num_classes + 1) hidden + (hidden + 1) latent_dim
    parameters."""
    for name, v in (("latent_dim", latent_dim), ("num_classes", num_classes),
                    ("noise_dim", noise_dim), ("hidden", hidden)):
        validate.positive(name, v, integer=True)
    module = _ConditionalMLP(latent_dim, num_classes, hidden)

    def init(key):
        return module.init(key, jnp.zeros((1, noise_dim)), jnp.zeros((1,), jnp.int32))["params"]

    def apply(params, eps, y):
        return module.apply({"params": params}, eps, y)

    return Generator(init=init, apply=apply, latent_dim=latent_dim, num_classes=num_classes,
                     noise_dim=noise_dim, hidden=hidden)
