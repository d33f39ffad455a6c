"""Pieces of a round shared by all algorithms: server state, local-work plan, sampling + batches,
client weights and the FedOpt server step (Reddi et al., ICLR 2021)."""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax
from flax import struct

from fedjax_lab.core import sharding
from fedjax_lab.core.batching import Batches, draw_batches
from fedjax_lab.core.sampling import first_draw, sample_clients, straggler_steps
from fedjax_lab.core.tree import tree_scale
from fedjax_lab.core.values import is_traced


@struct.dataclass
class ServerState:
    params: Any
    opt_state: Any
    round: jax.Array
    extra: Any = None     # an algorithm's extra server state (SCAFFOLD's c, FedDyn's h)


class Participation(struct.PyTreeNode):
    ids: jax.Array            # [C] sampled client ids
    batches: Batches          # idx [C, S, B], step_mask [C, S] (stragglers applied)
    is_straggler: jax.Array   # [C] bool
    num_examples: jax.Array   # [C] client train sizes n_k
    valid: Optional[jax.Array] = None  # [C] bool: a sampled client, not mesh padding


def sample_ids(key, data, cohort):
    """The [C] clients that `participate(key, data, cohort, work)` trains (unpadded); only the key
    matters, so a host-side store can compute them rounds ahead (core/store.py)."""
    return sample_clients(jax.random.split(key, 3)[0], data.num_clients, cohort.clients_per_round,
                          client_sizes=data.client_sizes, scheme=cohort.sampling)


_DISTINCT_KEYS = contextvars.ContextVar("distinct_keys", default=0)


@contextlib.contextmanager
def keys_repeat(distinct: int):
    """Tracing under this context, `participate` vmapped over a batch of keys expects at most
    `distinct` different keys among them (a sweep's runs that share a seed share their round keys,
    whatever their grid point): it draws once per different key and gives every row the draws of
    its key. The number is a hint, not a promise: each round checks it and draws for every key
    when it does not hold, so the numbers are those of the plain vmap either way."""
    token = _DISTINCT_KEYS.set(int(distinct))
    try:
        yield
    finally:
        _DISTINCT_KEYS.reset(token)


def participate(key, data, cohort, work, ids=None) -> Participation:
    """Sample clients, draw their batches on device and cut stragglers' work with the step mask.

    `cohort` (who) and `work` (how much) are the core/setup.py values.
    `ids`: `sample_ids(key, data, cohort)` when the caller has them already (it skips sampling, which
    costs O(N log N) for N clients; the result is the same).

    Under a mesh with a 'clients' axis of size D (core/sharding.py) the C sampled clients are
    padded to a multiple of D with dummy clients (id = num_clients, which gathers clamp and
    scatters drop; no steps, num_examples 0, valid False, hence weight 0 in `client_weights`) and
    every field is sharded along 'clients'. The real clients' ids, batches and stragglers are
    exactly those of the unpadded round. Without a mesh nothing is padded.

    Under `keys_repeat(U)` and a vmap over keys, the draws are made once per different key (at
    most U of them), as described there.
    """
    distinct = _DISTINCT_KEYS.get()
    if distinct and not any(is_traced(getattr(c, f.name)) for c in (cohort, work)
                            for f in dataclasses.fields(c)):   # a swept stragglers: rows differ
        return _once_per_key(key, data, ids, cohort=cohort, work=work, distinct=distinct)
    return _participate(key, data, cohort, work, ids)


def _once_per_key(key, data, ids, *, cohort, work, distinct):
    """`participate` whose vmap over keys draws once per different key (`keys_repeat`)."""
    one = lambda k, d, i: _participate(k, d, cohort, work, i)
    draw = jax.custom_batching.custom_vmap(one)

    @draw.def_vmap
    def rule(axis_size, in_batched, k, d, i):
        k_b, d_b, i_b = in_batched
        axes = lambda b: jax.tree.map(lambda x: 0 if x else None, b)
        if not k_b or any(jax.tree.leaves((d_b, i_b))) or distinct >= axis_size:
            out = jax.vmap(one, in_axes=(axes(k_b), axes(d_b), axes(i_b)))(k, d, i)
            return out, jax.tree.map(lambda _: True, out)
        raw = jax.random.key_data(k) if jnp.issubdtype(k.dtype, jax.dtypes.prng_key) else k
        raw = raw.reshape(axis_size, -1)
        first = jnp.argmax(jnp.all(raw[:, None] == raw[None, :], axis=-1), axis=1)  # first equal
        is_first = first == jnp.arange(axis_size)
        slot = jnp.cumsum(is_first) - 1                  # the place of a row's key among them
        reps = jnp.zeros(distinct, jnp.int32).at[jnp.where(is_first, slot, distinct)].set(
            jnp.arange(axis_size, dtype=jnp.int32), mode="drop")
        # rows of equal keys draw equally, so both branches read a row's draws from the first row
        # of its key (the fallback too: both branches then vary alike under a checked shard_map)
        rows = lambda keys, at: jax.tree.map(lambda a: a[at], jax.vmap(lambda kk: one(kk, d, i))(keys))
        out = jax.lax.cond(jnp.sum(is_first) <= distinct, lambda: rows(k[reps], slot[first]),
                           lambda: rows(k, first))
        return out, jax.tree.map(lambda _: True, out)
    return draw(key, data, ids)


def _participate(key, data, cohort, work, ids) -> Participation:
    _, k_batch, k_strag = jax.random.split(key, 3)
    if ids is None:
        ids = sample_ids(key, data, cohort)
    batches = draw_batches(k_batch, data, ids, batch_size=work.batch_size,
                           local_steps=work.local_steps, epochs=work.epochs, shuffle=work.shuffle)
    n = data.client_sizes[ids]
    if work.epochs is None:
        unit_steps, units = jnp.ones_like(n, jnp.float32), work.local_steps
    else:
        unit_steps, units = n / work.batch_size, work.epochs
    steps, is_straggler = straggler_steps(k_strag, batches.num_steps, work.stragglers,
                                          unit_steps=unit_steps, units=units,
                                          work=work.straggler_work)
    if cohort.sampling == "size":        # duplicates: one device, one amount of work
        first = first_draw(ids)
        steps, is_straggler = steps[first], is_straggler[first]
    mask = jnp.arange(batches.idx.shape[1])[None, :] < steps[:, None]
    part = Participation(ids=ids, batches=Batches(batches.idx, mask, steps),
                         is_straggler=is_straggler, num_examples=n, valid=jnp.ones(ids.shape, bool))
    size = sharding.padded_size(cohort.clients_per_round)
    if size != cohort.clients_per_round:
        fill = Participation(ids=data.num_clients, batches=Batches(0, False, 0), is_straggler=False,
                             num_examples=0, valid=False)
        part = sharding.pad_clients(part, size, fill)
    return sharding.shard_clients(part)


def client_weights(part: Participation, cohort, *, drop_stragglers: bool):
    """Aggregation weights p_k: n_k or 1, zero for dropped stragglers and clients with no steps."""
    w = part.num_examples.astype(jnp.float32) if cohort.weighting == "examples" \
        else jnp.ones(part.ids.shape, jnp.float32)
    w = w * (part.batches.num_steps > 0)
    w = w if part.valid is None else w * part.valid
    return jnp.where(part.is_straggler, 0.0, w) if drop_stragglers else w


def server_update(server_optimizer: optax.GradientTransformation, state: ServerState, mean_delta):
    """FedOpt: the pseudo-gradient is -mean_k(w_k - w_t); FedAvg is SGD with lr 1 on it."""
    pseudo_grad = tree_scale(mean_delta, -1.0)
    updates, opt_state = server_optimizer.update(pseudo_grad, state.opt_state, state.params)
    return state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state,
                         round=state.round + 1)


def init_server(server_optimizer, params) -> ServerState:
    return ServerState(params=params, opt_state=server_optimizer.init(params),
                       round=jnp.zeros((), jnp.int32))


def weighted_mean_scalar(values, weights):
    total = jnp.sum(weights)
    return jnp.where(total > 0, jnp.sum(values * weights) / jnp.where(total > 0, total, 1.0), 0.0)
