"""A hypernetwork that emits any target model's params pytree, by shape (pFedHN, Shamsian et al.).

    f = MLP(e) = L_{n+1}(relu(L_n(... relu(L_1(e)) ...)))    L_1: d -> hidden, L_j: hidden -> hidden
                                                              (n = n_hidden ReLU layers, the official
                                                              CNNHyper; no activation after the last)
    "per_leaf":  theta_l = reshape(W_l f + b_l)              one linear head per target leaf l
    "chunked":   theta = unravel(concat_k (W [f; z_k] + b)[:P])   K = ceil(P / chunk) chunks, learned
                                                              chunk embeddings z_k, one shared head

`hypernetwork(target, embed_dim=...)` takes the target's params pytree (arrays or
`jax.ShapeDtypeStruct`s, e.g. `jax.eval_shape(model.init, key, x[:1])`) and nothing else of the model.

Which generator. "per_leaf" is the official code's (one `nn.Linear(hidden, leaf size)` per target
tensor) and the default: its head costs hidden x P parameters for a target of P parameters, which
is fine for the small targets of the paper (LeNet-like CNN, ~ 10^5) and this repository's MLPs,
but 100 x 1,663,370 = 166 M parameters (665 MB) for the FedAvg CNN. "chunked" (the chunked
hypernetworks of von Oswald et al., ICLR 2020) emits the flat parameter vector `chunk` numbers at a
time from [f; z_k]: (hidden + chunk_embed_dim) x chunk + chunk + K x chunk_embed_dim parameters,
independent of P but for the K chunk embeddings (FedAvg CNN, chunk 16,384: 1.8 M). `num_params`
reports either.

`head_leaves(model, sample_x)` tells which of a model's params its `head` reads (pFedHN-PC keeps
those private and generates the rest); `head_mask(model, params, z)` is its pytree form (FedGen).

Initialization follows torch's `nn.Linear` default (what the official code gets): kernel and bias
uniform in +- 1 / sqrt(fan_in); chunk embeddings N(0, 1) like `nn.Embedding`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab.core import validate

GENERATORS = ("per_leaf", "chunked")


@dataclasses.dataclass(frozen=True, eq=False)
class HyperNetwork:
    """init(key) -> phi; apply(phi, e [embed_dim]) -> params shaped like `target`."""
    init: Callable[[Any], Any]
    apply: Callable[[Any, jax.Array], Any]
    num_params: int
    embed_dim: int
    target: Any


def _linears(key, sizes):
    """[{kernel [i, o], bias [o]}] for `sizes` [(i, o)], uniform in +- 1/sqrt(i), from one draw
    (one random-number kernel however many layers: fast to compile)."""
    counts = [n for i, o in sizes for n in (i * o, o)]
    u = jax.random.uniform(key, (sum(counts),), jnp.float32, -1.0, 1.0)
    parts = jnp.split(u, np.cumsum(counts)[:-1].tolist())
    return [{"kernel": parts[2 * j].reshape(i, o) / math.sqrt(i),
             "bias": parts[2 * j + 1] / math.sqrt(i)} for j, (i, o) in enumerate(sizes)]


def _dense(p, x):
    return x @ p["kernel"] + p["bias"]


def hypernetwork(target, *, embed_dim: int, hidden: int = 100, n_hidden: int = 3,
                 generator: str = "per_leaf", chunk: int = 16384,
                 chunk_embed_dim: int = 8) -> HyperNetwork:
    """The hypernetwork of the module docstring for the params pytree `target`."""
    validate.positive("embed_dim", embed_dim, integer=True)
    validate.positive("hidden", hidden, integer=True)
    if isinstance(n_hidden, bool) or not isinstance(n_hidden, int) or n_hidden < 0:
        raise ValueError(f"n_hidden must be a non-negative integer, got {n_hidden!r}")
    validate.one_of("generator", generator, set(GENERATORS))
    validate.positive("chunk", chunk, integer=True)
    validate.positive("chunk_embed_dim", chunk_embed_dim, integer=True)
    leaves, treedef = jax.tree.flatten(target)
    if not leaves:
        raise ValueError("target must hold at least one parameter array")
    shapes = [tuple(x.shape) for x in leaves]
    dtypes = [x.dtype for x in leaves]
    sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
    total = sum(sizes)
    num_chunks = -(-total // chunk)
    mlp_sizes = [(embed_dim, hidden)] + [(hidden, hidden)] * n_hidden

    def init(key):
        k_lin, k_z = jax.random.split(key)
        heads = [(hidden, n) for n in sizes] if generator == "per_leaf" else \
            [(hidden + chunk_embed_dim, chunk)]
        layers = _linears(k_lin, mlp_sizes + heads)
        mlp, heads = layers[:len(mlp_sizes)], layers[len(mlp_sizes):]
        if generator == "per_leaf":
            return {"mlp": mlp, "heads": heads}
        return {"mlp": mlp, "head": heads[0],
                "chunk_embed": jax.random.normal(k_z, (num_chunks, chunk_embed_dim), jnp.float32)}

    def features(phi, e):
        f = _dense(phi["mlp"][0], e)
        for layer in phi["mlp"][1:]:
            f = _dense(layer, jax.nn.relu(f))
        return f

    def apply(phi, e):
        f = features(phi, jnp.asarray(e, phi["mlp"][0]["kernel"].dtype))
        if generator == "per_leaf":
            flat = [_dense(h, f) for h in phi["heads"]]
        else:
            z = phi["chunk_embed"]
            inp = jnp.concatenate([jnp.broadcast_to(f, (z.shape[0], f.shape[0])), z], axis=1)
            vec = _dense(phi["head"], inp).reshape(-1)[:total]
            flat = jnp.split(vec, np.cumsum(sizes)[:-1].tolist())
        return jax.tree.unflatten(treedef, [v.reshape(s).astype(d)
                                            for v, s, d in zip(flat, shapes, dtypes)])

    mlp_params = sum(i * o + o for i, o in mlp_sizes)
    head_params = (hidden * total + total if generator == "per_leaf" else
                   (hidden + chunk_embed_dim) * chunk + chunk + num_chunks * chunk_embed_dim)
    return HyperNetwork(init=init, apply=apply, num_params=mlp_params + head_params,
                        embed_dim=embed_dim, target=target)


def head_mask(model, params, z):
    """A pytree of bools like `params` (arrays, tracers or shapes): True for the leaves that
    `model.head(params, z)` reads, found in its jaxpr (nothing is computed)."""
    leaves, treedef = jax.tree.flatten(params)
    jaxpr = jax.make_jaxpr(lambda ls, z_: model.head(jax.tree.unflatten(treedef, ls), z_))(
        leaves, z).jaxpr
    used = {id(v) for eqn in jaxpr.eqns for v in eqn.invars} | {id(v) for v in jaxpr.outvars}
    return jax.tree.unflatten(treedef, [id(v) in used for v in jaxpr.invars[:len(leaves)]])


def head_leaves(model, sample_x) -> list:
    """[bool per params leaf]: the leaves `model.head` reads, found in the jaxpr of
    `head(params, z)` (nothing is computed): the split pFedHN-PC keeps private. The zoo's mlp: "out",
    cnn / cnn_cifar: "fc". A model whose every parameter is head (logistic) is refused."""
    if model.features is None or model.head is None:
        raise ValueError(f"model {model.name!r} has no features/head split; pfedhn_pc needs one "
                         "(a model of the zoo such as mlp or cnn)")
    params = jax.eval_shape(model.init, jax.random.key(0), sample_x)
    mask = jax.tree.leaves(head_mask(model, params, jax.eval_shape(model.features, params,
                                                                   sample_x)))
    if all(mask):
        raise ValueError(f"model {model.name!r}: every parameter is in its head (nothing for the "
                         "hypernetwork to generate); pfedhn_pc needs a model with a body, e.g. mlp")
    return mask
