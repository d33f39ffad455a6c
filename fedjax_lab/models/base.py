"""Wrap a flax.linen module as a pure Model(init, apply[, features, head]).

We use flax.linen: its modules are stateless descriptions and parameters are plain pytrees, which
is what vmapping over stacked client parameters needs (nnx objects carry their state and would be
split/merged around every vmap). A module that defines `features(x, train)` and `head(z)` methods
gets the representation split; dropout randomness comes from the `rng` argument, which local
training derives per client and per step.
"""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from fedjax_lab.core.types import Model


@functools.partial(jax.jit, static_argnums=(0, 1))
def _init(module: nn.Module, stateful: bool, key, sample_x):
    """A linen module's params as one program, shared by equal modules (flax modules hash and compare
    by their fields): eagerly, `module.init` is one program per initializer op."""
    out = module.init({"params": key, "dropout": key}, sample_x, train=False)
    return {"params": out["params"], "batch_stats": out["batch_stats"]} if stateful else out["params"]


def from_linen(module: nn.Module, name: str) -> Model:
    """A linen module as a Model. A module with BatchNorm (class attribute `has_batch_norm = True`,
    its running statistics in the "batch_stats" collection) gets params
    {"params": ..., "batch_stats": ...}: train mode normalizes by the batch, eval mode by the
    running statistics, and `update_state` refreshes those after each local step (core/types.py)."""
    stateful = bool(getattr(module, "has_batch_norm", False))

    def variables(params):
        return params if stateful else {"params": params}

    def call(params, x, train, rng, method=None):
        rngs = {"dropout": rng} if (train and rng is not None) else {}
        if stateful and train:       # normalize by the batch; the statistics' update is discarded
            return module.apply(params, x, train=True, rngs=rngs, mutable=["batch_stats"],
                                method=method)[0]
        return module.apply(variables(params), x, train=train, rngs=rngs, method=method)

    try:
        hash(module)
        init_fn = _init
    except TypeError:                   # a field that does not hash: eagerly, as before
        init_fn = _init.__wrapped__

    def init(key, sample_x):
        return init_fn(module, stateful, key, sample_x)

    def apply(params, x, *, train=False, rng=None):
        return call(params, x, train, rng)

    update_state = None
    if stateful:
        def update_state(params, new_params, x, rng=None):
            rngs = {"dropout": rng} if rng is not None else {}
            _, new = module.apply(params, x, train=True, rngs=rngs, mutable=["batch_stats"])
            return {**new_params, "batch_stats": new["batch_stats"]}

    features = head = None
    if hasattr(module, "features") and hasattr(module, "head"):
        def features(params, x, *, train=False, rng=None):
            return call(params, x, train, rng, method=type(module).features)

        def head(params, z):
            return module.apply(variables(params), z, method=type(module).head)

    return Model(init=init, apply=apply, features=features, head=head, name=name,
                 update_state=update_state)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
    """`lax.conv_general_dilated` with a backward pass that XLA:CPU runs fast inside loops.

    Same forward; on CPU, for channel-last (NHWC / HWIO) convolutions with no dilation and no
    groups, the gradients of y = conv(x, w) (stride s, padding (lo, hi) per spatial dim) are

        dL/dx = conv(dilate_s(g), flip(w)^T)   flipped, in/out-transposed kernel, stride 1,
                                               padding (k-1-lo, n+k-1-(m-1)s-1-(k-1-lo))
        dL/dw = conv(x^T, dilate_s(g)^T)       x as [C, H, W, N] and g as the kernel [h, w, N, O]

    the same sums as jax's own transpose rules, but as ordinary channel-last convolutions on
    explicitly transposed operands. jax's rules express them through swapped dimension numbers
    (batch <-> feature), which XLA:CPU runs ~100x slower inside a `while` loop (lax.scan over
    local steps, lax.map over clients) than straight-line (experiments/PERF_CNN.md). Other
    backends and other convolutions use lax unchanged.
    """
    kw = dict(lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
              dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
              batch_group_count=batch_group_count, precision=precision,
              preferred_element_type=preferred_element_type)
    nd = lhs.ndim - 2
    undilated = all(d in (None, 1) for d in (lhs_dilation or ()) + (rhs_dilation or ()))
    if (jax.default_backend() != "cpu" or not undilated or feature_group_count != 1
            or batch_group_count != 1 or preferred_element_type is not None
            or not _channel_last(lhs.shape, rhs.shape, dimension_numbers)):
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kw)
    strides = tuple(window_strides) if window_strides is not None else (1,) * nd
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:-1], rhs.shape[:-2], strides, padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    return _conv(lhs, rhs, strides, pads, precision)


def _channel_last(lhs_shape, rhs_shape, dimension_numbers) -> bool:
    nd = len(lhs_shape) - 2
    spec = lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers)
    spatial = tuple(range(1, nd + 1))
    return (spec.lhs_spec == (0, nd + 1) + spatial and spec.out_spec == spec.lhs_spec
            and spec.rhs_spec == (nd + 1, nd) + tuple(range(nd)))


def _dn(nd):
    return lax.conv_dimension_numbers((1,) * (nd + 2), (1,) * (nd + 2),
                                      ("N" + "HWD"[:nd] + "C", "HWD"[:nd] + "IO", "N" + "HWD"[:nd] + "C"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, w, strides, pads, precision):
    return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_dn(x.ndim - 2),
                                    precision=precision)


def _conv_fwd(x, w, strides, pads, precision):
    return _conv(x, w, strides, pads, precision), (x, w)


def _conv_bwd(strides, pads, precision, res, g):
    x, w = res
    nd = x.ndim - 2
    ks = w.shape[:nd]
    w_t = jnp.swapaxes(jnp.flip(w, tuple(range(nd))), -1, -2)
    dpads = []
    for n, m, k, s, (lo, _) in zip(x.shape[1:-1], g.shape[1:-1], ks, strides, pads):
        before = k - 1 - lo
        dpads.append((before, n + k - 1 - ((m - 1) * s + 1) - before))
    dx = lax.conv_general_dilated(g, w_t, (1,) * nd, dpads, lhs_dilation=strides,
                                  dimension_numbers=_dn(nd), precision=precision)
    # dw[k, i, o] = sum_{n, p} xpad[n, p + k, i] g[n, p, o]: a convolution of x with g as the kernel
    # (dilated by the stride), written with explicit transposes so that XLA sees the ordinary
    # channel-last form: lhs [ci, *space, N], rhs [*out, N, co] -> [ci, *ks (+ slack), co]
    lhs = jnp.moveaxis(x, (0, x.ndim - 1), (x.ndim - 1, 0))
    rhs = jnp.moveaxis(g, 0, -2)
    dw = lax.conv_general_dilated(lhs, rhs, (1,) * nd, pads, rhs_dilation=strides,
                                  dimension_numbers=_dn(nd), precision=precision)
    dw = jnp.moveaxis(dw[(slice(None),) + tuple(slice(0, k) for k in ks)], 0, -2)
    return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)


OUTER_MAX_ROWS = 16      # dense_dot_general: kernel gradient as outer products up to this many rows
OUTER_MAX_KERNEL = 4096  # ... and kernels of at most this many entries (d * h)


def dense_dot_general(x, w, dimension_numbers, precision=None, preferred_element_type=None):
    """`lax.dot_general` for `nn.Dense(dot_general=...)`, with a kernel gradient that XLA:CPU runs
    fast for small layers and few rows.

    Same forward, y = x W (x [..., d], W [d, h]). The kernel cotangent is the same sum as jax's
    rule, dL/dW = x^T g = sum_r x_r g_r^T over the R = prod(x.shape[:-1]) rows, but on CPU, for
    R <= OUTER_MAX_ROWS rows and d h <= OUTER_MAX_KERNEL entries, it is written out as those R outer
    products (one elementwise fusion) instead of a dot: the tangent x dW is written row by row, so
    its transpose is that sum (a custom_jvp, so forward mode works too). vmapped over clients,
    jax's rule becomes a batched dot whose contracting axis is not minor, which XLA:CPU runs
    through a slow path (the logistic 60 -> 10 model's FedAvg round at C = 1000, batch 10: 1.5-1.8x
    faster this way, experiments/PERF.md); for larger layers the dot is faster and is kept, as on
    other backends.
    Equal to jax's gradient to float rounding (the summation order differs).
    """
    (lc, rc), (lb, rb) = dimension_numbers
    rows = math.prod(x.shape[:-1])
    if (jax.default_backend() != "cpu" or tuple(lc) != (x.ndim - 1,) or tuple(rc) != (0,)
            or lb or rb or w.ndim != 2 or preferred_element_type is not None
            or not 1 <= rows <= OUTER_MAX_ROWS or w.size > OUTER_MAX_KERNEL):
        return lax.dot_general(x, w, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)
    return _dense(x, w, precision)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _dense(x, w, precision):
    return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


@_dense.defjvp
def _dense_jvp(precision, primals, tangents):
    """dy = dx W + x dW with x dW written row by row, dy_r = x_r dW: its transpose, the kernel
    cotangent, is then the sum of the rows' outer products x_r g_r^T (custom_jvp rather than
    custom_vjp so that forward mode, e.g. Per-FedAvg's Hessian-vector products, works too)."""
    x, w = primals
    dx, dw = tangents
    y = _dense(x, w, precision)
    xr = x.reshape(-1, x.shape[-1])
    rows = [lax.dot_general(xr[r], dw, (((0,), (0,)), ((), ())), precision=precision)
            for r in range(xr.shape[0])]
    dy = (lax.dot_general(dx, w, (((dx.ndim - 1,), (0,)), ((), ())), precision=precision)
          + jnp.stack(rows).reshape(y.shape))
    return y, dy


# the model zoo's dense layer: flax's nn.Dense with the kernel gradient above
Dense = functools.partial(nn.Dense, dot_general=dense_dot_general)
