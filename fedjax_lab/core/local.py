"""Local training, written once: a `lax.scan` over a client's steps with an optax optimizer.

    w_{s+1} = w_s + opt.update(grad L(w_s; batch_s, s))     where step_mask[s] is True
    w_{s+1} = w_s, opt_state unchanged                          where it is False

L(w; batch) = mean example loss of the model + extra_loss(w) (e.g. FedProx's mu/2 ||w - w_t||^2).
The result reports both: `loss` is the data loss F_k a paper plots, `objective` the full L.
Masked steps leave params *and* optimizer state untouched, so variable local work (stragglers,
epochs over unequal clients) is a mask, never a Python branch.

Per-step statistics (optional, `step_stats`): sum_{s real} step_stats(w_s, batch_s, rng_s, u_s),
evaluated under the params w_s *before* step s (those of its loss), with the step's rng and u_s
the step's row of a per-step input the caller passes (e.g. per-example weights); e.g. FedProto's
prototypes of the last local epoch (algorithms/fedproto.py).

How `jax.vmap(train)` runs the clients (`clients=`). "vmap": batched ops, one XLA op per layer for
all clients. "map": a `lax.map` over the clients inside the same XLA program (each client's ops are
unbatched; `chunk` > 1 vmaps chunks of that many clients). On CPU, XLA's batched matmuls run far
below its plain ones at MLP sizes (784-200-200-10, batch 32: the vmapped round is ~5x slower than
a loop of per-client calls, a `lax.map` round ~6x faster than vmap; experiments/PERF.md), while for
tiny models (logistic 60 -> 10) vmap wins. "auto" (default): "map" on CPU for models of at least
MAP_MIN_PARAMS parameters whose client axis is not sharded over devices (one device per program:
fl.run, or each device of a sweep's runs), "vmap" otherwise (accelerators, sharded client axes). The
numbers are the same to float rounding either way (tests/test_bench_round.py).

The local steps stay a `lax.scan` (`unroll=1`) on every backend. XLA:CPU ran jax's own
convolution gradients ~10x slower inside the scan's while loop than straight-line; the model
zoo's convolutions carry a backward pass without that slowdown (models.base.conv_general_dilated),
which is faster than unrolling and compiles in half the time (experiments/PERF_CNN.md).
`weighted_sum_over_clients` bounds a round's memory for weighted-sum aggregators.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.core.sharding import num_client_shards
from fedjax_lab.core.tree import tree_num_params, tree_where
from fedjax_lab.core.types import Model, batch_loss


MAP_MIN_PARAMS = 20_000


class LocalResult(NamedTuple):
    params: object
    opt_state: object
    loss: jax.Array       # mean data loss F_k over the real steps (0 when there were none)
    num_steps: jax.Array  # number of real steps taken
    objective: jax.Array  # mean full local objective (data loss + extra_loss) over the real steps
    stats: object = None  # sum of step_stats over the real steps (None without step_stats)


def local_train(model: Model, optimizer: optax.GradientTransformation, *,
                extra_loss: Optional[Callable] = None, loss_fn: Optional[Callable] = None,
                extra_batch_loss: Optional[Callable] = None,
                step_stats: Optional[Callable] = None, clients: str = "auto", chunk: int = 1,
                unroll: int | bool = 1):
    """Returns train(params, x, y, idx [S, B], step_mask [S], key, opt_state=None, anchor=None,
    step_inputs=None) -> LocalResult.

    `x`, `y` are the flat federated arrays; the step's batch is gathered inside the scan, so the
    [C, S, B, ...] batch tensor is never materialized. `loss_fn(params, xb, yb, rng)` replaces the
    model's loss entirely (meta-learning, distillation); `extra_loss(params)` is added to it, or
    `extra_loss(params, anchor)` when `train` is given an `anchor` (a per-client reference point
    such as FedAMP's u_i: pass it as an argument, not in a closure, so that a vmap over clients
    that runs as a lax.map sees it as batched). `extra_batch_loss(params, xb, yb, rng, anchor)`
    is a term of the step's batch added to the objective, not to the data loss (MOON's
    model-contrastive loss).
    `step_stats(params, xb, yb, rng, u) -> pytree` (module docstring): called at every step with
    the pre-step params, the step's batch and rng (the same as its loss's: a forward pass inside
    it, e.g. `model.features(params, xb, train=True, rng=rng)`, gives the loss's activations,
    dropout masks included) and u = the step's row of `step_inputs` (a pytree of [S, ...] arrays,
    None if not given; pass per-client values here, not in a closure, as for `anchor`). Its
    outputs are summed over the real steps (step_mask) into `LocalResult.stats`; masked steps add
    nothing. Without step_stats, `stats` is None and nothing else changes.
    `clients` ("auto", "vmap" or "map") and `chunk` choose how a vmap over clients runs (module
    docstring); the result does not depend on them beyond float rounding. `unroll` is
    `lax.scan`'s over the local steps (True: straight-line code, compile time growing with S).
    """
    if clients not in ("auto", "vmap", "map"):
        raise ValueError(f"clients must be 'auto', 'vmap' or 'map', got {clients!r}")
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int (clients per vmapped chunk), got {chunk!r}")
    if not (isinstance(unroll, bool) or (isinstance(unroll, int) and unroll >= 1)):
        raise ValueError(f"unroll must be True, False or a positive int (steps per loop iteration), "
                         f"got {unroll!r}")
    base = loss_fn or (lambda p, xb, yb, rng: batch_loss(model, p, xb, yb, rng, train=True))

    def total(p, xb, yb, rng, anchor):
        data_loss = base(p, xb, yb, rng)
        extra = 0.0 if extra_loss is None else (
            extra_loss(p) if anchor is None else extra_loss(p, anchor))
        if extra_batch_loss is not None:
            extra = extra + extra_batch_loss(p, xb, yb, rng, anchor)
        return data_loss + extra, data_loss

    grad_fn = jax.value_and_grad(total, has_aux=True)

    def train_one(params, x, y, idx, step_mask, key, opt_state, anchor, step_inputs) -> LocalResult:
        if opt_state is None:
            opt_state = optimizer.init(params)

        def step(carry, inp):
            params, opt_state, stats = carry
            rows, active, s, u = inp
            xb, yb, rng = x[rows], y[rows], jax.random.fold_in(key, s)
            (objective, loss), g = grad_fn(params, xb, yb, rng, anchor)
            if step_stats is not None:
                stats = jax.tree.map(lambda acc, v: acc + jnp.where(active, v, 0).astype(acc.dtype),
                                     stats, step_stats(params, xb, yb, rng, u))
            updates, new_opt_state = optimizer.update(g, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            if model.update_state is not None:     # BatchNorm's running statistics
                new_params = model.update_state(params, new_params, xb, rng)
            carry = (tree_where(active, new_params, params), tree_where(active, new_opt_state, opt_state),
                     stats)
            return carry, (jnp.where(active, loss, 0.0), jnp.where(active, objective, 0.0))

        steps = jnp.arange(idx.shape[0])
        stats = None
        if step_stats is not None:
            one = lambda a: a[0]
            shapes = jax.eval_shape(step_stats, params, x[idx[0]], y[idx[0]],
                                    jax.random.fold_in(key, 0), jax.tree.map(one, step_inputs))
            stats = jax.tree.map(lambda sh: jnp.zeros(sh.shape, sh.dtype), shapes)
        (params, opt_state, stats), (losses, objectives) = jax.lax.scan(
            step, (params, opt_state, stats), (idx, step_mask, steps, step_inputs), unroll=unroll)
        n = jnp.sum(step_mask)
        mean = lambda v: jnp.sum(v) / jnp.maximum(n, 1)
        return LocalResult(params, opt_state, mean(losses), n, mean(objectives), stats)

    mapped = clients_as_map(train_one, chunk)

    def train(params, x, y, idx, step_mask, key, opt_state=None, anchor=None,
              step_inputs=None) -> LocalResult:
        use_map = clients == "map" or (clients == "auto" and map_pays_off(params))
        return (mapped if use_map else train_one)(params, x, y, idx, step_mask, key, opt_state,
                                                  anchor, step_inputs)

    return train


def map_pays_off(params) -> bool:
    """The "auto" rule: a lax.map over clients beats vmap on CPU for large models, unless the
    client axis is sharded over devices. (Not `jax.device_count() == 1`: a sweep spreads its runs
    over CPU devices and each device trains its runs' clients unsharded.)"""
    return (jax.default_backend() == "cpu" and num_client_shards() == 1
            and tree_num_params(params) >= MAP_MIN_PARAMS)


def clients_as_map(fn, chunk: int = 1):
    """`fn` whose vmap runs as `lax.map(fn, ..., batch_size=chunk)` over the batched arguments
    (the unbatched ones are shared), in the same XLA program; called unbatched it is `fn`.

    `clients_as_map.traced` counts the traces that took the map: fl.sweep reads it to learn
    whether a program's clients run as a map, and then maps its runs too (core/sweep.py)."""
    f = jax.custom_batching.custom_vmap(fn)

    @f.def_vmap
    def rule(axis_size, in_batched, *args):
        del axis_size
        clients_as_map.traced = getattr(clients_as_map, "traced", 0) + 1
        args = list(args)
        mapped = jax.tree.map(lambda b, a: a if b else None, in_batched, args)
        shared = jax.tree.map(lambda b, a: None if b else a, in_batched, args)

        def one(m):
            return fn(*jax.tree.map(lambda b, a_m, a_s: a_m if b else a_s, in_batched, m, shared))

        out = jax.lax.map(one, mapped, batch_size=chunk if chunk > 1 else None)
        return out, jax.tree.map(lambda _: True, out)

    return f


def weighted_sum_over_clients(fn, weights, *args, chunk: int):
    """sum_k weights[k] * fn(*args_k) (a pytree of sums); `args` are per-client arrays with the
    clients on their leading axis (close `fn` over what the clients share). It runs
    `chunk` clients at a time: a `lax.scan` over vmapped chunks that accumulates the sum, so a
    round's memory is that of `chunk` clients, not of all C (C need not divide by `chunk`: the
    last chunk is padded with weight-0 repeats of client 0).

    For aggregators that are weighted sums (FedAvg's mean): the [C, ...] stack of client messages
    that a median or Krum needs is never built."""
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int (clients per vmapped chunk), got {chunk!r}")
    C = weights.shape[0]
    n = -(-C // chunk)
    pick = jnp.where(jnp.arange(n * chunk) < C, jnp.arange(n * chunk), 0)
    w = jnp.where(jnp.arange(n * chunk) < C, weights[pick], 0).reshape(n, chunk)
    xs = jax.tree.map(lambda a: a[pick].reshape((n, chunk) + a.shape[1:]), args)
    batched = jax.vmap(fn)

    def add(acc, inp):
        wk, ak = inp
        out = batched(*ak)
        return jax.tree.map(lambda s, o: s + jnp.tensordot(wk, o, axes=1).astype(s.dtype),
                            acc, out), None

    shapes = jax.eval_shape(fn, *jax.tree.map(lambda a: a[0], args))
    zero = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.result_type(s.dtype, weights.dtype)), shapes)
    return jax.lax.scan(add, zero, (w, xs))[0]
