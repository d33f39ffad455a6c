"""Quantizers on the last axis of a flat vector, pure and vmappable over clients.

QSGD (Alistarh et al., NeurIPS 2017) with s levels: for v != 0,

    Q_s(v)_i = ||v||_2 * sign(v_i) * l_i / s,   l_i = floor(s |v_i| / ||v||_2) + Bernoulli(frac part)

an unbiased estimate of v (E[Q_s(v)] = v) with variance at most min(d/s^2, sqrt(d)/s) ||v||^2.
On the wire: one float32 norm plus a signed level in [-s, s] per coordinate at fixed width,
ceil(log2(2s + 1)) bits (the paper's Elias coding is shorter; we report the fixed-width cost).

Scaled sign (signSGD with a scale, as in EF-SignSGD, Karimireddy et al. 2019):

    C(v) = (||v||_1 / d) * sign(v)        one float32 scale + one bit per coordinate.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjax_lab.core import validate


class Quantized(NamedTuple):
    norm: jax.Array     # [...] the l2 norm of each vector
    levels: jax.Array   # [..., d] int32 signed levels in [-s, s]


class Signed(NamedTuple):
    scale: jax.Array    # [...] ||v||_1 / d
    signs: jax.Array    # [..., d] int8 in {-1, +1} (0 maps to +1)


def qsgd(key, v, *, levels: int) -> Quantized:
    """Stochastic quantization of v to `levels` (s) levels per sign (unbiased)."""
    validate.positive("levels", levels, integer=True)
    norm = jnp.linalg.norm(v, axis=-1)
    safe = jnp.where(norm > 0, norm, 1.0)[..., None]
    r = jnp.abs(v) / safe * levels
    low = jnp.floor(r)
    up = jax.random.uniform(key, v.shape) < (r - low)
    lv = jnp.minimum(low + up, levels).astype(jnp.int32)
    return Quantized(norm, (jnp.sign(v).astype(jnp.int32) * lv))


def qsgd_decode(q: Quantized, *, levels: int):
    return q.norm[..., None] * q.levels.astype(jnp.float32) / levels


def qsgd_bytes(dim: int, *, levels: int) -> int:
    """float32 norm + dim fixed-width signed levels of ceil(log2(2s + 1)) bits."""
    return 4 + math.ceil(dim * math.ceil(math.log2(2 * levels + 1)) / 8)


def scaled_sign(v) -> Signed:
    """(||v||_1 / d, sign(v)) with sign(0) = +1."""
    return Signed(jnp.mean(jnp.abs(v), axis=-1), jnp.where(v >= 0, 1, -1).astype(jnp.int8))


def scaled_sign_decode(s: Signed):
    return s.scale[..., None] * s.signs.astype(jnp.float32)


def scaled_sign_bytes(dim: int) -> int:
    """float32 scale + one packed bit per coordinate."""
    return 4 + math.ceil(dim / 8)
