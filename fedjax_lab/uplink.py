"""Uplink transforms: what a client does to its message before sending it, composed like optax.

    up = uplink.chain(uplink.noise("gaussian", sigma=0.1), uplink.sign())   # noisy signSGD
    sent = up.encode(messages [C, ...], key, ids)   # what the server receives (decoded), [C, ...]
    up.bytes(template)                               # bytes one client sends, from the shapes

Every transform acts on each client's message independently (vmapped over the stacked clients),
draws its randomness from (round key, its own stream constant, client id), so a client's message
does not depend on who else was sampled, and accounts its bytes exactly: the last transform that
changes the representation decides the size (noise keeps it, sign makes it 1 bit a coordinate,
top-k k (value, index) pairs, QSGD its levels). Transforms that keep state across rounds (error
feedback) need client rows and live with their algorithms (algorithms/local_topk.py).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from fedjax_lab import compression as cz
from fedjax_lab.core import comm, validate, values
from fedjax_lab.core.setup import ValueKind, register_value_kind
from fedjax_lab.core.tree import flatten

NOISE_STREAM = 0x401   # fold_in constant: the noise's random stream, apart from the attack's
QSGD_STREAM = 0x9560


@dataclasses.dataclass(frozen=True, eq=False)
class Uplink:
    """encode(msgs [C, ...], key, ids [C]) -> msgs; bytes(template, inner_bytes) -> int."""
    name: str
    encode: Callable
    bytes: Callable
    options: tuple = ()

    def describe(self, prefix=None) -> dict:
        return {"uplink": self.name,
                **{f"uplink_{k}": values.json_value(v) for k, v in self.options}}


def _per_client(fn):
    """Lift fn(message, key_of_client) to the stacked messages, with keys folded from the ids."""
    def encode(msgs, key, ids):
        return jax.vmap(lambda m, i: fn(m, jax.random.fold_in(key, i)))(msgs, ids)
    return encode


def _flat(fn):
    """fn over a client's flat vector, returned as a pytree of the same structure."""
    def apply(m, key):
        flat, unravel = flatten(m)
        return unravel(fn(flat, key))
    return apply


def identity() -> Uplink:
    """Send the message as it is (dense float32)."""
    return Uplink("identity", lambda msgs, key, ids: msgs, lambda t, inner: inner)


def perturb(g, key, *, noise: str, sigma):
    """g + sigma * xi, xi ~ N(0, 1) ("gaussian") or U[-1, 1] ("uniform"), iid per coordinate.

    The stream (a contract, tested in tests/test_robust_median.py): one key per leaf,
    jax.random.split(key, num_leaves) in jax.tree.flatten order, xi = jax.random.normal /
    uniform(k, leaf.shape, leaf.dtype[, -1, 1]). `noise` passes client i the key
    fold_in(fold_in(round_key, NOISE_STREAM), i), so i's noise depends on the round and on i only
    (not on its row, nor on who else was sampled)."""
    if not values.is_traced(sigma) and sigma == 0:
        return g
    leaves, treedef = jax.tree.flatten(g)
    keys = jax.random.split(key, len(leaves))
    draw = (lambda k, x: jax.random.normal(k, x.shape, x.dtype)) if noise == "gaussian" else \
        (lambda k, x: jax.random.uniform(k, x.shape, x.dtype, -1.0, 1.0))
    return jax.tree.unflatten(treedef, [x + sigma * draw(k, x) for k, x in zip(keys, leaves)])


def noise(kind: str = "gaussian", sigma: float = 0.1) -> Uplink:
    """m -> m + sigma xi (Chen et al. 2020's perturbation; xi gaussian or uniform on [-1, 1]).
    Client i of a round draws from fold_in(fold_in(round key, NOISE_STREAM), i)."""
    validate.one_of("noise", kind, {"gaussian", "uniform"})
    validate.non_negative("sigma", sigma)
    per = _per_client(lambda m, k: perturb(m, k, noise=kind, sigma=sigma))
    return Uplink("noise", lambda msgs, key, ids: per(msgs, jax.random.fold_in(key, NOISE_STREAM), ids),
                  lambda t, inner: inner, (("kind", kind), ("sigma", sigma)))


def sign() -> Uplink:
    """m -> sign(m), one packed bit per coordinate (a zero coordinate sends 0, as jnp.sign)."""
    return Uplink("sign", lambda msgs, key, ids: jax.tree.map(jnp.sign, msgs),
                  lambda t, inner: comm.sign_bytes(t))


def top_k(k: int) -> Uplink:
    """Keep the k coordinates of largest magnitude (no error feedback); k (float32, int32) pairs."""
    validate.positive("k", k, integer=True)
    fn = _per_client(_flat(lambda v, key: cz.to_dense(cz.top_k(v, k), v.shape[0])))
    return Uplink("top_k", fn, lambda t, inner: cz.sparse_bytes(k), (("k", k),))


def qsgd(levels: int = 4) -> Uplink:
    """QSGD (Alistarh et al. 2017): unbiased stochastic rounding of |v_j| / ||v|| to `levels` levels."""
    validate.positive("levels", levels, integer=True)
    enc = _per_client(_flat(lambda v, key: cz.qsgd_decode(cz.qsgd(key, v, levels=levels),
                                                          levels=levels)))
    size = lambda t, inner: cz.qsgd_bytes(sum(int(x.size) for x in jax.tree.leaves(t)), levels=levels)
    return Uplink("qsgd", lambda msgs, key, ids: enc(msgs, jax.random.fold_in(key, QSGD_STREAM), ids),
                  size, (("levels", levels),))


def chain(*uplinks: Uplink) -> Uplink:
    """Apply the transforms left to right; the bytes are those of the last one that sizes.
    Transform i > 0 draws from fold_in(key, i), so two random ones (noise then noise) do not
    share their randomness; the first keeps the round key (chain(noise, sign) is noise's stream)."""
    if len(uplinks) == 1:
        return uplinks[0]

    def encode(msgs, key, ids):
        for i, u in enumerate(uplinks):
            msgs = u.encode(msgs, key if i == 0 else jax.random.fold_in(key, i), ids)
        return msgs

    def size(t, inner):
        for u in uplinks:
            inner = u.bytes(t, inner)
        return inner
    opts = tuple((f"{i}_{k}", v) for i, u in enumerate(uplinks) for k, v in u.options)
    return Uplink("+".join(u.name for u in uplinks), encode, size, opts)


UPLINKS = {"identity": identity, "noise": noise, "sign": sign, "top_k": top_k, "qsgd": qsgd}


def get(name_or_uplink, **opts) -> Uplink:
    """An Uplink from its `describe()` form: a name ("top_k", or a chain "noise+sign") and its
    options ({"k": 10}; in a chain prefixed by the position, {"0_sigma": 0.1})."""
    if isinstance(name_or_uplink, Uplink):
        return name_or_uplink
    parts = str(name_or_uplink).split("+")
    for p in parts:
        validate.one_of("uplink", p, UPLINKS)
    if len(parts) == 1:
        return UPLINKS[parts[0]](**opts)
    mine = lambda i: {k[len(f"{i}_"):]: v for k, v in opts.items() if k.startswith(f"{i}_")}
    return chain(*(UPLINKS[p](**mine(i)) for i, p in enumerate(parts)))


register_value_kind("uplink", ValueKind(Uplink, identity, get))
