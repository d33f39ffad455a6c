"""Byzantine attacks on the stacked client updates of one round, and label-flipping data poisoning.

Update attacks share one signature and are vectorized over the client axis:

    updates = attack(updates [C, ...], is_attacker [C] bool, key, *, weights=None, scale=...)

Rows with `is_attacker` False are returned unchanged; `weights` (the aggregation weights, 0 for
absent clients) only matter to attacks that use the honest clients' statistics (ALIE).

    sign_flip      u_k -> -scale * u_k                                (scale 1: plain sign flip)
    gaussian       u_k -> scale * N(0, I): noise of a fixed scale, blind to the real update
                   (the Gaussian Byzantine workers of Blanchard et al. 2017)
    random_update  u_k -> scale * sd_k * N(0, I), sd_k the standard deviation of the coordinates of
                   u_k itself: Ditto's A2 "random updates" (Li et al., ICML 2021), random zero-mean
                   Gaussian updates as large as the real one
    scaled         u_k -> scale * u_k   model replacement / boosting  (Bagdasaryan et al. 2020)
    alie           u_k -> mu - z_max * sd  per coordinate, mu, sd over the honest present updates;
                   z_max = Phi^{-1}((n - s) / n), s = floor(n / 2 + 1) - f   ("A little is enough",
                   Baruch et al. 2019); `scale` > 0 overrides z_max.
Label flipping is data poisoning: malicious clients train on y -> num_classes - 1 - y
(Tolpegin et al. 2020; Fang et al. 2020), see `flip_labels`.

Who attacks: `malicious_clients(num_clients, fraction)` is a fixed set of round(fraction * N)
client ids drawn once from `seed` (Byzantine clients stay Byzantine); a round's attackers are the
sampled clients in that set, `is_attacker = malicious[ids]`. `sample_attackers` instead picks exactly
round(fraction * C) of the C sampled rows (a fixed count per round, as in Byzantine-worker studies).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtri

from fedjax_lab.core import validate
from fedjax_lab.core.setup import ValueKind, register_value_kind

ATTACKS = {
    "none": "no attack",
    "sign_flip": "attackers send -attack_scale * their update",
    "gaussian": "attackers send attack_scale * N(0, I) noise (a fixed scale, not Ditto's A2)",
    "random_update": "Ditto's A2: attackers send N(0, sd^2 I), sd the std of their own update's "
                     "coordinates (times attack_scale)",
    "scaled": "attackers send attack_scale * their update (model replacement / boosting)",
    "alie": "'a little is enough': mean - z_max * std of the honest updates, per coordinate",
    "label_flip": "data poisoning: attackers train on labels num_classes - 1 - y",
}
UPDATE_ATTACKS = ("sign_flip", "gaussian", "random_update", "scaled", "alie")
DEFAULT_SCALE = {"sign_flip": 1.0, "gaussian": 1.0, "random_update": 1.0, "scaled": 10.0, "alie": 0.0}


def check_attack(attack: str, attack_fraction: float, attack_scale=None):
    """ValueError naming the argument: unknown attack, fraction outside [0, 1), bad scale."""
    validate.one_of("attack", attack, ATTACKS)
    validate.fraction("attack_fraction", attack_fraction, closed_right=False)
    if attack == "none" and attack_fraction > 0:
        raise ValueError(f"attack_fraction={attack_fraction} needs an attack; expected attack in "
                         f"{sorted(set(ATTACKS) - {'none'})} or attack_fraction=0")
    if attack_scale is not None:
        validate.non_negative("attack_scale", attack_scale)


def malicious_clients(num_clients: int, fraction: float, *, seed: int = 0):
    """[N] bool: a fixed random set of round(fraction * N) malicious clients (jittable, static N)."""
    validate.fraction("attack_fraction", fraction, closed_right=False)
    k = int(round(fraction * num_clients))
    perm = jax.random.permutation(jax.random.key(seed), num_clients)
    return jnp.zeros(num_clients, bool).at[perm[:k]].set(True)


def sample_attackers(key, num_sampled: int, fraction: float):
    """[C] bool with exactly round(fraction * C) attackers at random positions."""
    validate.fraction("attack_fraction", fraction, closed_right=False)
    k = int(round(fraction * num_sampled))
    return jnp.zeros(num_sampled, bool).at[jax.random.permutation(key, num_sampled)[:k]].set(True)


def _expand(v, x):
    return v.reshape(v.shape + (1,) * (x.ndim - 1))


def _replace(updates, is_attacker, bad):
    return jax.tree.map(lambda u, b: jnp.where(_expand(is_attacker, u), b.astype(u.dtype), u),
                        updates, bad)


def sign_flip(updates, is_attacker, key=None, *, weights=None, scale: float = 1.0):
    return _replace(updates, is_attacker, jax.tree.map(lambda u: -scale * u, updates))


def _normal_like(updates, key):
    """N(0, I) of the updates' structure, [C, ...] per leaf: independent across rows (clients)."""
    leaves, treedef = jax.tree.flatten(updates)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [jax.random.normal(k, u.shape, jnp.float32)
                                        for k, u in zip(keys, leaves)])


def gaussian(updates, is_attacker, key, *, weights=None, scale: float = 1.0):
    """Attackers send scale * N(0, I), whatever the size of the real updates."""
    return _replace(updates, is_attacker, jax.tree.map(lambda z: scale * z, _normal_like(updates, key)))


def random_update(updates, is_attacker, key, *, weights=None, scale: float = 1.0):
    """Ditto's A2: attacker k sends scale * sd_k * N(0, I), sd_k^2 = 1/P sum_j (u_kj - mean_k)^2
    over all P coordinates of its own update u_k (every leaf together).

    The details (one sd per attacker, over all of its layers, about its own mean) are the authors'
    code's: litian96/ditto, trainers_MTL/ditto.py, `random_updates`, np.std of the attacker's
    flattened update, then np.random.normal(0, sd) per coordinate. `scale` (default 1) multiplies sd.
    """
    rows = lambda u: u.reshape(u.shape[0], -1).astype(jnp.float32)
    leaves = jax.tree.leaves(updates)
    P = sum(rows(u).shape[1] for u in leaves)
    mean = sum(jnp.sum(rows(u), 1) for u in leaves) / P
    var = sum(jnp.sum(jnp.square(rows(u) - mean[:, None]), 1) for u in leaves) / P
    sd = jnp.sqrt(var)                                  # [C]; two passes, no [C, P] copy
    return _replace(updates, is_attacker,
                    jax.tree.map(lambda z: scale * _expand(sd, z) * z, _normal_like(updates, key)))


def scaled(updates, is_attacker, key=None, *, weights=None, scale: float = 10.0):
    return _replace(updates, is_attacker, jax.tree.map(lambda u: scale * u, updates))


def alie_z(n, f):
    """Baruch et al.'s z_max for n clients of which f attack: Phi^{-1}((n - s) / n), s = floor(n/2+1) - f."""
    n = jnp.asarray(n, jnp.float32)
    s = jnp.floor(n / 2 + 1) - f
    return ndtri(jnp.clip((n - s) / jnp.maximum(n, 1.0), 1e-6, 1 - 1e-6))


def alie(updates, is_attacker, key=None, *, weights=None, scale: float = 0.0):
    """Every attacker sends mu - z * sd (coordinate-wise over the honest present updates)."""
    present = jnp.ones(is_attacker.shape, bool) if weights is None else jnp.asarray(weights) > 0
    honest = (present & ~is_attacker).astype(jnp.float32)
    n_h = jnp.maximum(jnp.sum(honest), 1.0)
    z = jnp.where(scale > 0, scale, alie_z(jnp.sum(present), jnp.sum(present & is_attacker)))

    def leaf(u):
        h = _expand(honest, u)
        mu = jnp.sum(h * u, axis=0) / n_h
        sd = jnp.sqrt(jnp.sum(h * jnp.square(u - mu), axis=0) / n_h)
        return jnp.broadcast_to(mu - z * sd, u.shape)
    return _replace(updates, is_attacker, jax.tree.map(leaf, updates))


_FNS = {"sign_flip": sign_flip, "gaussian": gaussian, "random_update": random_update, "scaled": scaled,
        "alie": alie}


def apply_attack(name: str, updates, is_attacker, key, *, weights=None, scale=None):
    """Dispatch on `name` (a static string); "none" and "label_flip" leave the updates untouched."""
    if name in ("none", "label_flip"):
        return updates
    validate.one_of("attack", name, ATTACKS)
    scale = DEFAULT_SCALE[name] if scale is None else scale
    return _FNS[name](updates, is_attacker, key, weights=weights, scale=scale)


def flip_labels(data, is_malicious, *, num_classes=None):
    """FederatedArrays whose malicious clients' training labels are num_classes - 1 - y (jittable).

    `is_malicious` is [num_clients] bool; the test split is left clean.
    """
    num_classes = num_classes or data.num_classes
    if num_classes < 2:
        raise ValueError(f"flip_labels needs num_classes >= 2, got {num_classes}")
    bad = jnp.asarray(is_malicious)[data.client_ids()]
    return data.replace(y=jnp.where(bad, num_classes - 1 - data.y, data.y).astype(data.y.dtype))


ATTACK_STREAM = 0xA77AC   # fold_in constant: the attack's randomness, apart from sampling/training


@dataclasses.dataclass(frozen=True)
class Adversary:
    """The attack an algorithm runs under, written once for every algorithm that takes `attack`:
    `poison(data)` before local training (label flipping), `corrupt(updates, ids, key, weights)`
    on the stacked messages after it. The malicious set is fixed by `seed` (Byzantine clients stay
    Byzantine); a round's attackers are its sampled malicious clients."""
    attack: str = "none"
    fraction: float = 0.0
    scale: Optional[float] = None
    seed: int = 0

    FLAG_PREFIX = "attack"               # flags: attack, attack_fraction, attack_scale, attack_seed
    FLAG_NAMES = {"attack": "attack"}

    def __post_init__(self):
        check_attack(self.attack, self.fraction, self.scale)

    def malicious(self, num_clients: int):
        return malicious_clients(num_clients, self.fraction, seed=self.seed)

    def poison(self, data):
        if self.attack != "label_flip":
            return data
        return flip_labels(data, self.malicious(data.num_clients))

    def corrupt(self, updates, ids, num_clients: int, key, *, weights=None):
        if self.attack not in UPDATE_ATTACKS:
            return updates
        return apply_attack(self.attack, updates, self.malicious(num_clients)[ids],
                            jax.random.fold_in(key, ATTACK_STREAM), weights=weights, scale=self.scale)

    def config(self) -> dict:
        return {} if self.attack == "none" else {"attack_scale": self.scale, "attack_seed": self.seed}


__all__ = ["Adversary", "ATTACKS", "UPDATE_ATTACKS", "check_attack", "malicious_clients", "sample_attackers",
           "sign_flip", "gaussian", "random_update", "scaled", "alie", "alie_z", "apply_attack",
           "flip_labels"]


register_value_kind("attack", ValueKind(Adversary, Adversary, flags=True))
