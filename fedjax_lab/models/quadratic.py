"""Quadratic toy problems: client k's loss is F_k(x) = 1/2 ||x - a_k||^2 averaged over its examples.

The examples are the points themselves (labels are unused), so a client whose examples are copies
of a_k has exact local gradients x - a_k. Used for federated mean estimation (Ditto's closed form)
and for heterogeneous quadratics where the mean and the median of the clients' optima differ
(Chen et al., NeurIPS 2020). `dim` parameters, zero at init unless `init` fixes the start x_0.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from fedjax_lab.core.types import Model
from fedjax_lab.data.federated import FederatedArrays, federated_arrays


def quadratic(dim: int | None = None, *, init=None) -> Model:
    """params {"x": [dim]} (dim from the sample when None); per-example loss 1/2 ||x - point||^2.

    `init`: the starting point x_0, the same for every key: a scalar (every coordinate) or an array
    of shape [dim]. None starts at 0.
    """
    x0 = None if init is None else np.asarray(init, np.float32)
    if x0 is not None and not np.all(np.isfinite(x0)):
        raise ValueError(f"init must be finite, got {init!r}")

    def check(shape):
        if x0.ndim != 0 and x0.shape != shape:
            raise ValueError(f"init must be a scalar or an array of shape {shape}, got shape {x0.shape}")

    if x0 is not None and dim is not None:
        check((dim,))                                   # early, when the shape is known

    def init_fn(key, sample_x):
        shape = (dim,) if dim is not None else tuple(sample_x.shape[1:])
        if x0 is None:
            return {"x": jnp.zeros(shape, jnp.float32)}
        check(shape)
        return {"x": jnp.broadcast_to(jnp.asarray(x0), shape)}

    return Model(init=init_fn, apply=lambda p, xb, *, train=False, rng=None: p["x"][None, :] - xb,
                 loss=lambda z, y: 0.5 * jnp.sum(jnp.square(z), -1), name="quadratic")


def quadratic_clients(centers, copies: int = 4) -> FederatedArrays:
    """One client per row of `centers` [M, dim], holding `copies` copies of its center."""
    centers = np.asarray(centers, np.float32)
    m = centers.shape[0]
    return federated_arrays(np.repeat(centers, copies, 0), np.zeros(m * copies, int),
                            np.arange(m + 1) * copies, num_classes=1)
