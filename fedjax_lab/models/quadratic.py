"""Quadratic toy problems: client k's loss is F_k(x) = 1/2 ||x - a_k||^2 averaged over its examples.

The examples are the points themselves (labels are unused), so a client whose examples are copies
of a_k has exact local gradients x - a_k. Used for federated mean estimation (Ditto's closed form)
and for heterogeneous quadratics where the mean and the median of the clients' optima differ
(Chen et al., NeurIPS 2020). `dim` parameters, all zero at init.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from fedjax_lab.core.types import Model
from fedjax_lab.data.federated import FederatedArrays, federated_arrays


def quadratic(dim: int | None = None) -> Model:
    """params {"x": [dim]} (dim from the sample when None); per-example loss 1/2 ||x - point||^2."""
    def init(key, sample_x):
        return {"x": jnp.zeros((dim,) if dim is not None else sample_x.shape[1:], jnp.float32)}

    return Model(init=init, apply=lambda p, xb, *, train=False, rng=None: p["x"][None, :] - xb,
                 loss=lambda z, y: 0.5 * jnp.sum(jnp.square(z), -1), name="quadratic")


def quadratic_clients(centers, copies: int = 4) -> FederatedArrays:
    """One client per row of `centers` [M, dim], holding `copies` copies of its center."""
    centers = np.asarray(centers, np.float32)
    m = centers.shape[0]
    return federated_arrays(np.repeat(centers, copies, 0), np.zeros(m * copies, int),
                            np.arange(m + 1) * copies, num_classes=1)
