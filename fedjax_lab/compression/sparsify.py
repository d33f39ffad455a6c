"""Sparsifiers on the last axis of a flat vector, pure and vmappable over clients.

    top_k(v)      keeps the k coordinates of largest |v_i|                       (biased)
    random_k(v)   keeps k uniformly random coordinates, scaled by d/k if unbiased  E[.] = v
    error feedback (Stich et al. 2018; Karimireddy et al. 2019):
        a = v + e,   sent = C(a),   e <- a - sent      so nothing is lost, only delayed.

A sparse message is k float32 values plus k int32 indices: 8 k bytes (`sparse_bytes`). Random-k
with a seed shared by sender and receiver needs no indices (`random_k_bytes(shared_seed=True)`).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjax_lab.core import validate


class Sparse(NamedTuple):
    idx: jax.Array      # [..., k] int32 coordinates
    values: jax.Array   # [..., k] their values


def _check_k(k, dim):
    validate.positive("k", k, integer=True)
    if k > dim:
        raise ValueError(f"k must be <= the vector length {dim}, got k={k}")


def top_k(v, k: int) -> Sparse:
    """The k coordinates of largest magnitude (ties: lowest index first)."""
    _check_k(k, v.shape[-1])
    _, idx = jax.lax.top_k(jnp.abs(v), k)
    return Sparse(idx.astype(jnp.int32), jnp.take_along_axis(v, idx, axis=-1))


def random_k(key, v, k: int, *, unbiased: bool = True) -> Sparse:
    """k coordinates drawn uniformly without replacement; values scaled by d/k when `unbiased`."""
    d = v.shape[-1]
    _check_k(k, d)
    # argsort of uniform keys on the last axis = a uniform permutation per leading row
    u = jax.random.uniform(key, v.shape)
    idx = jnp.argsort(u, axis=-1)[..., :k].astype(jnp.int32)
    vals = jnp.take_along_axis(v, idx, axis=-1)
    return Sparse(idx, vals * (d / k) if unbiased else vals)


def to_dense(sparse: Sparse, dim: int):
    """The dense [..., dim] vector of a (possibly batched) sparse message."""
    lead = sparse.idx.shape[:-1]
    idx = sparse.idx.reshape((-1, sparse.idx.shape[-1]))
    vals = sparse.values.reshape(idx.shape)
    out = jax.vmap(lambda i, x: jnp.zeros(dim, x.dtype).at[i].add(x))(idx, vals)
    return out.reshape(lead + (dim,))


def with_error_feedback(compress, v, error):
    """(message, new error) of `compress` applied to a = v + error; new error = a - decode(message).

    `compress(a) -> Sparse` (e.g. `lambda a: top_k(a, k)`); the error keeps what was not sent.
    """
    a = v + error
    msg = compress(a)
    return msg, a - to_dense(msg, v.shape[-1])


def sparse_bytes(k: int, *, value_bytes: int = 4, index_bytes: int = 4) -> int:
    """Bytes of k (value, int32 index) pairs."""
    return int(k) * (value_bytes + index_bytes)


def random_k_bytes(k: int, *, shared_seed: bool = False, value_bytes: int = 4) -> int:
    """Bytes of a random-k message: values only when the index seed is shared (+ 4-byte seed)."""
    return int(k) * value_bytes + 4 if shared_seed else sparse_bytes(k, value_bytes=value_bytes)
