"""Wrap a flax.linen module as a pure Model(init, apply[, features, head]).

We use flax.linen: its modules are stateless descriptions and parameters are plain pytrees, which
is what vmapping over stacked client parameters needs (nnx objects carry their state and would be
split/merged around every vmap). A module that defines `features(x, train)` and `head(z)` methods
gets the representation split; dropout randomness comes from the `rng` argument, which local
training derives per client and per step.
"""
from __future__ import annotations

import flax.linen as nn

from fedjax_lab.core.types import Model


def from_linen(module: nn.Module, name: str) -> Model:
    def init(key, sample_x):
        return module.init({"params": key, "dropout": key}, sample_x, train=False)["params"]

    def apply(params, x, *, train=False, rng=None):
        rngs = {"dropout": rng} if (train and rng is not None) else {}
        return module.apply({"params": params}, x, train=train, rngs=rngs)

    features = head = None
    if hasattr(module, "features") and hasattr(module, "head"):
        def features(params, x, *, train=False, rng=None):
            rngs = {"dropout": rng} if (train and rng is not None) else {}
            return module.apply({"params": params}, x, train=train, rngs=rngs,
                                method=type(module).features)

        def head(params, z):
            return module.apply({"params": params}, z, method=type(module).head)

    return Model(init=init, apply=apply, features=features, head=head, name=name)
