"""Local batches drawn on device: (key, client ids) -> example indices and a step mask.

Each client's examples form a stream of shuffled passes (epochs) over its own data; step s of
client c takes stream positions s*B ... s*B + B - 1. Two modes:

* steps mode  (`epochs=None`): every client does `local_steps` steps of B examples.
* epochs mode (`epochs=E`):    client c does ceil(E * n_c / B) steps, i.e. E passes over its data
  (the last batch is topped up from the start of the stream); the array holds the largest
  client's count and the step mask turns the rest off.

Shuffling (`shuffle`):
* "epoch": each pass is a fresh uniform permutation of the client's n_c examples (sort of random
  keys over the static width max_client_size; examples beyond n_c sort last). No example repeats
  within a pass.
* "replacement": every position is an independent uniform draw from the client's examples.
* "auto" (default): "epoch" unless the permutations would take more than 2**24 random keys
  per round (many passes of tiny clients next to a huge one), then "replacement".

Batches depend only on (key, client id), not on which other clients were sampled, so a per-client
reference loop given the same key draws the same batches.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

SHUFFLE_BUDGET = 1 << 24


class Batches(NamedTuple):
    idx: jax.Array        # [C, S, B] int32 rows of the flat data arrays
    step_mask: jax.Array  # [C, S] bool: step s of client c is real work
    num_steps: jax.Array  # [C] int32 number of real steps


def plan_steps(data, *, local_steps=None, epochs=None, batch_size: int):
    """Static number of scan steps S for this data (the largest client's in epochs mode)."""
    if epochs is None:
        return int(local_steps)
    return max(1, math.ceil(epochs * data.max_client_size / batch_size))


def full_steps(sizes, *, local_steps=None, epochs=None, batch_size: int):
    """[C] steps each client would do without stragglers."""
    if epochs is None:
        return jnp.full(sizes.shape, local_steps, jnp.int32)
    return jnp.ceil(epochs * sizes / batch_size).astype(jnp.int32)


def _passes_needed(data, num_steps, batch_size, epochs):
    if epochs is not None:
        return int(epochs)
    return max(1, math.ceil(num_steps * batch_size / max(data.min_client_size, 1)))


def resolve_shuffle(shuffle: str, data, num_clients: int, num_steps: int, batch_size: int, epochs):
    if shuffle not in ("auto", "epoch", "replacement"):
        raise ValueError(f"shuffle must be 'auto', 'epoch' or 'replacement', got {shuffle!r}")
    if shuffle != "auto":
        return shuffle
    cost = num_clients * _passes_needed(data, num_steps, batch_size, epochs) * data.max_client_size
    return "epoch" if cost <= SHUFFLE_BUDGET else "replacement"


PACKED_SORT_MAX_WIDTH = 512


def epoch_permutations(key, n, *, passes: int, width: int, positions: int | None = None):
    """[passes, width] int32; in every row the first n entries are a uniform permutation of 0..n-1.

    Row p is argsort (stable) of u ~ U[0, 1)^width with the entries at and beyond n set to 2.0.
    `jax.random.uniform` makes u from the top 23 bits m of `jax.random.bits` (u = m * 2**-23), so
    for width <= PACKED_SORT_MAX_WIDTH the same permutation is one single-operand sort of the
    uint32 (m << index_bits) | index: the index in the low bits breaks ties as a stable sort does,
    and the padding key 2**23 - 1 with its index >= n still sorts after every real entry. XLA's
    CPU sort of one operand is ~5x faster than the two-operand (key, iota) sort behind argsort,
    and the result is identical (tests/test_bench_round.py checks it against the argsort).

    `positions` (S * B, the stream positions a client reads; pass p starts at position p * n):
    [passes, k] with k = min(width, positions), the first k columns, holding those entries only in
    the rows the stream reaches (p * n < positions; the other entries are unspecified). Pass
    p >= 1 is reached only when n < positions / p, so its real keys lie in its first
    ceil(positions / p) columns and it is sorted at that width (rounded up to a power of two, at
    most k); pass 0 is sorted at full width, on CPU by `lax.top_k(-u, k)` when k <
    width and width > PACKED_SORT_MAX_WIDTH (XLA:CPU's TopK breaks ties by the lower index, as the
    stable argsort does). Same indices, far less sorting: the full-width argsort of every pass was
    44% of a logistic FedProx round on Synthetic(1,1) (width 800, 5 passes, S * B = 200) and a
    per-run cost that a sweep's stacked runs do not make denser (experiments/PERF.md, issue 28).
    """
    k = width if positions is None else max(1, min(int(positions), width))
    m = lambda p, q, w: _bits(key, (passes, width), p, q, w) >> 9    # rows p..q-1, first w columns
    if k == width or passes == 1:
        return _first_ranks(m(0, passes, width), n, k)
    # pass p >= 1 is reached only when n < positions / p: sort its first w_p columns, w_p the power
    # of two >= ceil(positions / p) (at most k), passes of equal w_p in one sort
    w = {p: min(k, 1 << (-(-int(positions) // p) - 1).bit_length()) for p in range(1, passes)}
    parts, p = [_first_ranks(m(0, 1, width), n, k)], 1
    while p < passes:
        q = p
        while q + 1 < passes and w[q + 1] == w[p]:
            q += 1
        block = _first_ranks(m(p, q + 1, w[p]), n, k)
        parts.append(jnp.pad(block, ((0, 0), (0, k - block.shape[1]))))
        p = q + 1
    return jnp.concatenate(parts)


def _bits(key, shape, p, q, w):
    """`jax.random.bits(key, shape, uint32)[p:q, :w]` (shape = (passes, width)), computing only those
    entries. With threefry keys and jax_threefry_partitionable (the default), entry i of the
    flattened shape is threefry2x32(key, (0, i)) with its two words xor-ed: computed here for the
    entries needed, unrolled (one elementwise fusion). jax's CPU lowering runs the 20 rounds as a
    loop of 5 blocks over the whole array, and a permutation reads few of its passes' columns
    (a 12-run logistic FedProx sweep: 105 of its 818 ms of device time per 60 rounds went to those
    loops; 554 ms in all after; experiments/PERF.md, issue 28).
    Other key kinds: jax.random.bits, sliced."""
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    data = jax.random.key_data(key) if typed else key
    impl = str(jax.random.key_impl(key)) if typed else jax.config.jax_default_prng_impl
    threefry = impl == "threefry2x32"
    if not (threefry and jax.config.jax_threefry_partitionable) or shape[0] * shape[1] >= 1 << 32:
        return jax.random.bits(key, shape, jnp.uint32)[p:q, :w]
    i = (jnp.arange(p, q, dtype=jnp.uint32)[:, None] * jnp.uint32(shape[1])
         + jnp.arange(w, dtype=jnp.uint32)[None, :])
    b1, b2 = threefry2x32(data[0], data[1], jnp.zeros_like(i), i)
    return b1 ^ b2


_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def threefry2x32(k1, k2, x1, x2):
    """Threefry-2x32 with 20 rounds (Salmon et al., SC 2011), as jax's `threefry2x32_p`: key words
    (k1, k2), counter words (x1, x2) -> the two output words; unrolled jnp ops that XLA fuses."""
    rotl = lambda v, d: (v << jnp.uint32(d)) | (v >> jnp.uint32(32 - d))
    ks = (k1, k2, k1 ^ k2 ^ jnp.uint32(0x1BD11BDA))
    x1, x2 = x1 + ks[0], x2 + ks[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x1 = x1 + x2
            x2 = rotl(x2, r) ^ x1
        x1 = x1 + ks[(i + 1) % 3]
        x2 = x2 + ks[(i + 2) % 3] + jnp.uint32(i + 1)
    return x1, x2


def _first_ranks(m, n, k):
    """[rows, min(k, width)]: the first columns of the stable argsort of m * 2**-23 per row, keys at
    and beyond column n set to 2.0 (epoch_permutations)."""
    rows, width = m.shape
    k = min(k, width)
    col = jax.lax.broadcasted_iota(jnp.uint32, (rows, width), 1)
    real = col < jnp.asarray(n).astype(jnp.uint32)
    if width <= PACKED_SORT_MAX_WIDTH:
        index_bits = max(1, (width - 1).bit_length())
        m = jnp.where(real, m, jnp.uint32((1 << 23) - 1))
        packed = jax.lax.sort((m << index_bits) | col, dimension=1)[:, :k]
        return (packed & jnp.uint32((1 << index_bits) - 1)).astype(jnp.int32)
    u = jnp.where(real, m.astype(jnp.float32) * jnp.float32(2.0 ** -23), 2.0)   # = uniform's u
    if k < width and jax.default_backend() == "cpu":
        return jax.lax.top_k(-u, k)[1].astype(jnp.int32)
    return jnp.argsort(u, axis=1)[:, :k].astype(jnp.int32)


def client_batches(key, lo, n, *, num_steps: int, batch_size: int, passes: int, width: int,
                   shuffle: str, stream_len=None):
    """[S, B] row indices of one client with rows lo ... lo + n - 1 (the un-vmapped core)."""
    pos = jnp.arange(num_steps * batch_size).reshape(num_steps, batch_size)
    n_safe = jnp.maximum(n, 1)
    if stream_len is not None:             # epochs mode: wrap the last batch to the stream start
        pos = pos % jnp.maximum(stream_len, 1)
    if shuffle == "replacement":
        local = jax.random.randint(key, pos.shape, 0, n_safe)
    else:
        perms = epoch_permutations(key, n, passes=passes, width=width,
                                   positions=num_steps * batch_size)
        epoch = jnp.minimum(pos // n_safe, passes - 1)
        local = perms[epoch, pos % n_safe]
    return (lo + local).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("batch_size", "local_steps", "epochs", "shuffle",
                                             "num_steps"))
def draw_batches(key, data, ids, *, batch_size: int, local_steps=None, epochs=None,
                 shuffle: str = "auto", num_steps=None) -> Batches:
    """Batches for the sampled clients `ids` ([C] int). See the module docstring. Jitted: called
    outside a round (a reference loop, a notebook), it is one program, not over a hundred
    one-op ones."""
    S = plan_steps(data, local_steps=local_steps, epochs=epochs, batch_size=batch_size) \
        if num_steps is None else num_steps
    C = ids.shape[0]
    mode = resolve_shuffle(shuffle, data, C, S, batch_size, epochs)
    lo = data.offsets[ids]
    n = data.offsets[ids + 1] - lo
    steps = full_steps(n, local_steps=local_steps, epochs=epochs, batch_size=batch_size)
    steps = jnp.where(n > 0, jnp.minimum(steps, S), 0)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(ids)
    stream_len = None if epochs is None else epochs * n
    fn = lambda k, lo_, n_, sl: client_batches(
        k, lo_, n_, num_steps=S, batch_size=batch_size, width=max(data.max_client_size, 1),
        passes=_passes_needed(data, S, batch_size, epochs), shuffle=mode, stream_len=sl)
    idx = jax.vmap(fn, in_axes=(0, 0, 0, None if stream_len is None else 0))(keys, lo, n, stream_len)
    idx = jnp.minimum(idx, max(data.num_examples - 1, 0))
    mask = jnp.arange(S)[None, :] < steps[:, None]
    return Batches(idx=idx, step_mask=mask, num_steps=steps)
