"""Count sketch (Charikar, Chen & Farach-Colton 2002) of flat vectors, pure and jittable.

A sketch with r rows and c columns maps v in R^d to a table S(v) in R^{r x c}:

    S(v)[j, b] = sum_{i : h_j(i) = b} s_j(i) * v_i          h_j: [d] -> [c],  s_j: [d] -> {-1, +1}

It is linear (S(a + b) = S(a) + S(b), S(alpha v) = alpha S(v)), so the sum of C clients' sketches
is the sketch of their sum, and momentum and error feedback can run on tables (FetchSGD). A
coordinate is estimated by the median over rows of its signed cells,

    U(S)_i = median_j  s_j(i) * S[j, h_j(i)],

and heavy hitters are the top-k coordinates of |U(S)|, optionally refined by a second round that
asks for the exact values of the candidates (Ivkin et al. 2019; FetchSGD Sec. 4).

Hash choice. h_j and s_j are *functions of the index* seeded from a key: two uint32 seeds per row
(`jax.random.bits`), and `lowbias32` (an integer mixer; bias 0.17 on the avalanche test) of
`i ^ seed`, reduced mod c for the bucket and its top bit for the sign. Nothing of size d is stored:
the sketch record is 8 r bytes of seeds, and hashes are recomputed (and fused into the scatter by
XLA) where they are used. Server and clients derive the same functions from the same key, so only
the table travels. The alternative, random [r, d] bucket/sign tables (csvec, the official FetchSGD
code), costs 20 MB at d = 1M, r = 5 and was no faster here (XLA's CPU gather is slower than
recomputing the hash). The mixer is not provably pairwise independent; the tests check the
behaviour that matters (uniform buckets, balanced signs, heavy-hitter recovery).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from fedjax_lab.core import validate


@struct.dataclass
class CountSketch:
    """Hash and sign functions of an r x c count sketch of vectors of length `dim`."""
    seeds: jax.Array                                  # [rows, 2] uint32: bucket seed, sign seed
    dim: int = struct.field(pytree_node=False)
    rows: int = struct.field(pytree_node=False)
    cols: int = struct.field(pytree_node=False)

    @property
    def num_bytes(self) -> int:
        """Bytes of one float32 table on the wire."""
        return 4 * self.rows * self.cols


def count_sketch(key, dim: int, *, rows: int, cols: int) -> CountSketch:
    """A count sketch of R^dim with `rows` x `cols` cells, its hashes derived from `key`."""
    validate.positive("dim", dim, integer=True)
    validate.positive("rows", rows, integer=True)
    validate.positive("cols", cols, integer=True)
    if dim >= 2 ** 32:
        raise ValueError(f"dim must be < 2**32 (hashes take uint32 indices), got {dim}")
    return CountSketch(seeds=jax.random.bits(key, (rows, 2), jnp.uint32), dim=dim, rows=rows,
                       cols=cols)


def lowbias32(x):
    """Chris Wellons' 32-bit integer mixer (uint32 -> uint32, wrapping arithmetic)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def hashes(cs: CountSketch, idx):
    """(buckets [rows, n] int32 in [0, cols), signs [rows, n] float32 in {-1, +1}) of indices idx."""
    i = jnp.asarray(idx).astype(jnp.uint32)[None, :]
    buckets = lowbias32(i ^ cs.seeds[:, :1]) % jnp.uint32(cs.cols)
    signs = 1.0 - 2.0 * (lowbias32(i ^ cs.seeds[:, 1:]) >> 31).astype(jnp.float32)
    return buckets.astype(jnp.int32), signs


def _flat_cells(cs: CountSketch, idx):
    buckets, signs = hashes(cs, idx)
    return (buckets + cs.cols * jnp.arange(cs.rows, dtype=jnp.int32)[:, None]), signs


def sketch(cs: CountSketch, v):
    """S(v): [..., dim] -> [..., rows, cols]. Leading axes (e.g. clients) are one batched scatter-add."""
    v = jnp.asarray(v)
    if v.shape[-1] != cs.dim:
        raise ValueError(f"v must have last axis dim={cs.dim}, got shape {v.shape}")
    lead = v.shape[:-1]
    flat = v.reshape((-1, cs.dim))
    cells, signs = _flat_cells(cs, jnp.arange(cs.dim))
    vals = (flat[:, None, :] * signs[None]).reshape(flat.shape[0], -1)
    table = jnp.zeros((flat.shape[0], cs.rows * cs.cols), v.dtype).at[:, cells.reshape(-1)].add(vals)
    return table.reshape(lead + (cs.rows, cs.cols))


def sketch_sparse(cs: CountSketch, idx, values):
    """S(v) for v with `values` at coordinates `idx` and zeros elsewhere (k cells per row, not d)."""
    cells, signs = _flat_cells(cs, idx)
    table = jnp.zeros(cs.rows * cs.cols, values.dtype).at[cells.reshape(-1)].add(
        (signs * values[None, :]).reshape(-1))
    return table.reshape(cs.rows, cs.cols)


def sketch_clients(cs: CountSketch, vs, *, chunk: int | None = None):
    """S(v_k) for stacked client vectors vs [C, dim] -> [C, rows, cols].

    One batched scatter-add; `chunk` bounds memory by running clients in vmapped chunks of that size
    (`lax.map(..., batch_size=chunk)`), e.g. for 1,000 clients of a 1M-parameter model.
    """
    if chunk is None or chunk >= vs.shape[0]:
        return sketch(cs, vs)
    return jax.lax.map(lambda v: sketch(cs, v), vs, batch_size=chunk)


def query(cs: CountSketch, table, idx):
    """U(S) at coordinates idx: median over rows of s_j(i) S[j, h_j(i)]. table [..., rows, cols]."""
    buckets, signs = hashes(cs, idx)
    est = table[..., jnp.arange(cs.rows)[:, None], buckets] * signs        # [..., rows, n]
    return jnp.median(est, axis=-2)


def unsketch(cs: CountSketch, table):
    """U(S) at every coordinate: [..., rows, cols] -> [..., dim]."""
    return query(cs, table, jnp.arange(cs.dim))


def heavy_hitters(cs: CountSketch, table, k: int, *, num_candidates: int | None = None,
                  exact=None):
    """Top-k coordinates of the sketched vector: (idx [k] int32, values [k]).

    One round (exact=None): the k largest |U(S)_i|, valued by their estimates U(S)_i.
    Second round (`exact(candidates) -> exact values`, e.g. clients sending their values at the
    candidates): the `num_candidates` (>= k, default k) largest |U(S)_i| are candidates, the k
    candidates of largest exact magnitude are kept, with their exact values.
    """
    validate.positive("k", k, integer=True)
    m = k if num_candidates is None else num_candidates
    validate.positive("num_candidates", m, integer=True)
    if not k <= m <= cs.dim:
        raise ValueError(f"need k <= num_candidates <= dim={cs.dim}, got k={k}, "
                         f"num_candidates={m}")
    est = unsketch(cs, table)
    _, cand = jax.lax.top_k(jnp.abs(est), m)
    if exact is None:
        vals = est[cand]
    else:
        vals = exact(cand)
    _, keep = jax.lax.top_k(jnp.abs(vals), k)
    return cand[keep].astype(jnp.int32), vals[keep]
