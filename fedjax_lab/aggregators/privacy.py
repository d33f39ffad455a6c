"""Differential privacy for federated averaging: DP-FedAvg (McMahan, Ramage, Talwar, Zhang,
"Learning Differentially Private Recurrent Language Models", ICLR 2018), adaptive clipping (Andrew,
Thakkar, McMahan, Ramaswamy, "Differentially Private Learning with Adaptive Clipping", NeurIPS
2021) and the privacy accounting of Google's `dp-accounting` (optional extra `privacy`).

User-level DP: the unit protected is a client. Round t, a cohort S_t of the N clients, client k's
update Delta_k = w_k - w_t (the skeleton's message), S the clipping bound, z the noise multiplier:

    clip:   Delta_k <- Delta_k * min(1, S / ||Delta_k||_2)             (the whole update, per client)
    noise:  Delta   = (sum_{k in S_t} Delta_k + N(0, (z S)^2 I)) / m    (once, on the sum, at the server)
    w_{t+1} = ServerOpt(w_t, -Delta)                                    (any server optimizer)

m is the *expected* cohort size q N = C (`expected_clients`, default the cohort's C): the paper's
fixed-denominator estimator f~_f (its Sec. 2, with every weight w_k = 1), whose denominator does
not depend on who took part, so that one client changes the sum by at most S and nothing else.
Clients with weight 0 (dropped stragglers, mesh padding) are out of the sum and still in m (under
a mesh that pads the cohort, pass expected_clients=C: 0 takes the padded number of rows). The
noise is drawn once per round from fold_in(round key, NOISE_STREAM): one key per leaf,
jax.random.split(k, num_leaves) in jax.tree.flatten order, xi = jax.random.normal(k_leaf, shape).

`aggregators.dp_mean(noise_multiplier=z, clip_norm=S)` is this rule as an aggregator value, so it
composes with every algorithm whose server averages client messages (FedAvg / FedOpt / FedProx,
Ditto's global model, FedMeta, Per-FedAvg; any uplink transform acts before it, any server
optimizer after it): `Setup(aggregator=aggregators.dp_mean(1.0, 0.5))`.

Adaptive clipping (Andrew et al., Alg. 1 with the geometric update), `adaptive_clipping(alg)`:

    b_k     = 1[||Delta_k|| <= S_t]                                    (before clipping)
    b~_t    = (sum_{k in S_t} b_k + N(0, sigma_b^2)) / m
    S_{t+1} = S_t * exp(-eta_C (b~_t - gamma))                         gamma: target quantile

The update's noise multiplier is then z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2), so that releasing
the update and the count costs as much privacy as one Gaussian mechanism of noise multiplier z
(the paper's Sec. 3.1: the count of (b_k - 1/2) has sensitivity 1/2); it needs sigma_b > z / 2.
Defaults are the paper's: gamma = 0.5, eta_C = 0.2, sigma_b = m / 20, S_0 = the dp_mean's S.

Accounting (`Accountant`, `epsilon(rounds)`): T rounds of the sampled Gaussian mechanism, composed
by dp-accounting's RDP accountant (default) or its PLD accountant, for one of two samplings:
  * "without_replacement" (default): C distinct clients drawn uniformly, which is exactly what
    `Cohort(sampling="uniform")` runs. dp-accounting's SampledWithoutReplacementDpEvent, valid
    for the replace-one relation (N public): replacing one client moves the clipped sum by up to
    2 S, so the Gaussian event's noise multiplier is z / 2. RDP only.
  * "poisson": every client independently with probability q = C / N (the paper's sampling, with
    the add/remove-one relation and sensitivity S, noise multiplier z): PoissonSampledDpEvent.
    The simulator's cohort has a fixed size, so this is the paper's accounting for the paper's
    sampling, reported for comparison, not the exact guarantee of the run. RDP or PLD.
The driver writes epsilon (with delta) to metrics.jsonl at every evaluation (core/driver.py).

Paper vs. here: the paper weighs client k by w_k = min(n_k / w^, 1); here every present client
weighs 1 (no cap w^ to choose, the same sensitivity S). Its flat clipping is ours; its per-layer
clipping is not offered. Its server step is "w_{t+1} = w_t + Delta" (server SGD, lr 1), our
default; any server optimizer is post-processing and keeps the guarantee.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import struct

from fedjax_lab.aggregators.base import Aggregator
from fedjax_lab.core import validate, values

NOISE_STREAM = 0xD1F   # fold_in constant: the server noise on the sum
COUNT_STREAM = 0xD20   # fold_in constant: the noise on adaptive clipping's count
SAMPLINGS = ("without_replacement", "poisson")
METHODS = ("rdp", "pld")


# --------------------------------------------------------------------------- the mechanism

def clip_updates(updates, clip_norm):
    """Each client's update (a row of the stacked pytree [C, ...]) scaled to norm <= clip_norm.
    Returns (clipped [C, ...], norms [C]: the norms before clipping)."""
    leaves = jax.tree.leaves(updates)
    norms = jnp.sqrt(sum(jnp.sum(jnp.reshape(x.astype(jnp.float32), (x.shape[0], -1)) ** 2, axis=1)
                         for x in leaves))
    scale = jnp.minimum(1.0, clip_norm / jnp.maximum(norms, jnp.finfo(jnp.float32).tiny))
    clipped = jax.tree.map(lambda x: x * scale.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype),
                           updates)
    return clipped, norms


def gaussian_like(key, tree, std):
    """std * N(0, I) shaped like `tree`: one key per leaf, split in jax.tree.flatten order."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [std * jax.random.normal(k, x.shape, x.dtype)
                                        for k, x in zip(keys, leaves)])


def private_mean(updates, weights, key, *, clip_norm, noise_multiplier, expected_clients):
    """(sum_{p_k > 0} clip(Delta_k) + N(0, (z S)^2)) / m (module docstring). Returns
    (Delta, norms [C], present [C])."""
    clipped, norms = clip_updates(updates, clip_norm)
    present = weights > 0
    total = jax.tree.map(lambda c: jnp.tensordot(present.astype(c.dtype), c, axes=1), clipped)
    noise = gaussian_like(jax.random.fold_in(key, NOISE_STREAM), total, noise_multiplier * clip_norm)
    delta = jax.tree.map(lambda s, n: (s + n) / expected_clients, total, noise)
    return delta, norms, present


@dataclasses.dataclass(frozen=True, eq=False)
class DPMean(Aggregator):
    """DP-FedAvg's aggregator (module docstring): aggregate(updates, weights, key) -> Delta.
    `needs_key`: the round skeleton passes it the round key (Aggregator.apply)."""
    noise_multiplier: float = 1.0
    clip_norm: Any = 1.0
    expected_clients: int = 0          # 0: the number of rows of the stack (the cohort's C)
    delta: float = 1e-5
    sampling: str = "without_replacement"
    accountant: str = "rdp"
    needs_key = True

    def denominator(self, num_rows: int) -> int:
        return self.expected_clients or num_rows

    def make_accountant(self, alg, data):
        """The driver's accountant for `alg` (accountant_for): epsilon(delta) after each round."""
        return accountant_for(alg, data)


def dp_mean(noise_multiplier: float = 1.0, clip_norm: float = 1.0, expected_clients: int = 0,
            delta: float = 1e-5, sampling: str = "without_replacement", accountant: str = "rdp"
            ) -> DPMean:
    """DP-FedAvg (McMahan et al. 2018): (sum_k clip_S(Delta_k) + N(0, (z S)^2)) / m, m = the
    expected cohort size (`expected_clients`, 0: the cohort's C). `delta`, `sampling`
    ("without_replacement" or "poisson") and `accountant` ("rdp" or "pld") say how the driver
    reports epsilon(delta). See aggregators/privacy.py."""
    validate.non_negative("noise_multiplier", noise_multiplier)
    validate.positive("clip_norm", clip_norm)
    if not (isinstance(expected_clients, int) and not isinstance(expected_clients, bool)
            and expected_clients >= 0):
        raise ValueError(f"expected_clients must be an integer >= 0 (0: the cohort's "
                         f"clients_per_round), got {expected_clients!r}")
    check_delta(delta)
    validate.one_of("sampling", sampling, set(SAMPLINGS))
    validate.one_of("accountant", accountant, set(METHODS))
    if accountant == "pld" and sampling != "poisson":
        raise ValueError("accountant='pld' accounts for sampling='poisson' only; use "
                         "accountant='rdp' for sampling='without_replacement'")

    def aggregate(updates, weights, key):
        m = expected_clients or weights.shape[0]
        return private_mean(updates, weights, key, clip_norm=clip_norm,
                            noise_multiplier=noise_multiplier, expected_clients=m)[0]

    def check(clients_per_round):
        if expected_clients and expected_clients > clients_per_round:
            raise ValueError(f"expected_clients={expected_clients} exceeds clients_per_round="
                             f"{clients_per_round}: m is the expected number of clients per round")
    opts = (("noise_multiplier", noise_multiplier), ("clip_norm", clip_norm),
            ("expected_clients", expected_clients), ("delta", delta), ("sampling", sampling),
            ("accountant", accountant))
    return DPMean("dp_mean", aggregate, check, opts, noise_multiplier=noise_multiplier,
                  clip_norm=clip_norm, expected_clients=expected_clients, delta=delta,
                  sampling=sampling, accountant=accountant)


def check_delta(delta):
    if values.is_traced(delta) or not (validate._finite(delta) and 0 < delta < 1):
        raise ValueError(f"delta must lie in (0, 1), got {delta!r}")


# --------------------------------------------------------------------------- adaptive clipping

@struct.dataclass
class AdaptiveState:
    inner: Any              # the wrapped algorithm's state
    clip_norm: jax.Array    # S_t


def update_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2): the update's share of the total noise z."""
    if noise_multiplier == 0:
        return 0.0
    if not 2 * count_stddev > noise_multiplier:
        raise ValueError(f"count_stddev must be > noise_multiplier / 2 = {noise_multiplier / 2:g} "
                         f"(Andrew et al. Sec. 3.1: z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2) must "
                         f"exist), got {count_stddev!r}")
    return (noise_multiplier ** -2 - (2 * count_stddev) ** -2) ** -0.5


def geometric_clip_update(clip_norm, norms, present, key, *, target_quantile, clip_lr,
                          count_stddev, expected_clients):
    """S_{t+1} = S_t exp(-eta_C (b~ - gamma)), b~ = (sum_k 1[||Delta_k|| <= S_t] + N(0, sigma_b^2)) / m.
    Returns (S_{t+1}, b~)."""
    count = jnp.sum(jnp.where(present, norms <= clip_norm, False).astype(jnp.float32))
    noisy = (count + count_stddev * jax.random.normal(jax.random.fold_in(key, COUNT_STREAM))) \
        / expected_clients
    return clip_norm * jnp.exp(-clip_lr * (noisy - target_quantile)), noisy


def adaptive_clipping(alg, *, target_quantile: float = 0.5, clip_lr: float = 0.2,
                      count_stddev: Optional[float] = None):
    """`alg` (built with `Setup(aggregator=dp_mean(z, S_0))`, an algorithm whose round is its
    round skeleton's: FedAvg, FedOpt, FedProx) with the clip norm S_t adapted to the
    `target_quantile` gamma of the update norms at rate `clip_lr` eta_C, its count noised with
    `count_stddev` sigma_b (None: m / 20). State: AdaptiveState(inner, clip_norm). Metrics add
    clip_norm (S_t used this round) and unclipped_fraction (b~_t). Module docstring."""
    agg = getattr(alg.setup, "aggregator", None)
    if not isinstance(agg, DPMean):
        raise ValueError("adaptive_clipping: alg must be built with Setup(aggregator="
                         f"aggregators.dp_mean(...)), got aggregator {getattr(agg, 'name', agg)!r}")
    sr = alg.server_round
    if sr is None or getattr(alg.round, "__func__", None) is not type(sr).round \
            or getattr(alg.round, "__self__", None) is not sr:
        raise ValueError(f"adaptive_clipping: {alg.name} has its own round around the skeleton; "
                         "it wraps algorithms whose round is the skeleton's (FedAvg, FedOpt, FedProx)")
    validate.fraction("target_quantile", target_quantile)
    validate.non_negative("clip_lr", clip_lr)
    m = agg.denominator(sr.setup.cohort.clients_per_round)
    sigma_b = m / 20.0 if count_stddev is None else count_stddev
    validate.positive("count_stddev", sigma_b)
    z_delta = update_noise_multiplier(agg.noise_multiplier, sigma_b)

    def init(key, data):
        return AdaptiveState(inner=alg.init(key, data),
                             clip_norm=jnp.asarray(agg.clip_norm, jnp.float32))

    def round_fn(state, data, key):
        def aggregate(updates, weights, k):
            delta, norms, present = private_mean(updates, weights, k, clip_norm=state.clip_norm,
                                                 noise_multiplier=z_delta, expected_clients=m)
            next_clip, unclipped = geometric_clip_update(
                state.clip_norm, norms, present, k, target_quantile=target_quantile,
                clip_lr=clip_lr, count_stddev=sigma_b, expected_clients=m)
            return delta, dict(next_clip_norm=next_clip, unclipped_fraction=unclipped)
        # this round's aggregator, at S_t; S_{t+1} comes back as an aux output in the metrics
        bound = dataclasses.replace(agg, aggregate=aggregate, has_aux=True)
        step_round = dataclasses.replace(sr, setup=dataclasses.replace(sr.setup, aggregator=bound))
        inner, metrics = step_round.round(state.inner, data, key)
        next_clip = metrics.pop("next_clip_norm")
        return AdaptiveState(inner=inner, clip_norm=next_clip), dict(metrics, clip_norm=state.clip_norm)

    config = dict(alg.config, adaptive_clipping=True, target_quantile=target_quantile,
                  clip_lr=clip_lr, count_stddev=sigma_b)
    return dataclasses.replace(
        alg, init=init, round=round_fn, config=config,
        client_params=lambda s, ids: alg.client_params(s.inner, ids),
        global_params=None if alg.global_params is None else (lambda s: alg.global_params(s.inner)),
        server_round=None)


# --------------------------------------------------------------------------- accounting

@dataclasses.dataclass(frozen=True)
class Accountant:
    """epsilon(delta) after T rounds of DP-FedAvg with noise multiplier z, C of N clients per
    round (module docstring: `sampling` and `method`)."""
    noise_multiplier: float
    num_clients: int
    clients_per_round: int
    delta: float = 1e-5
    sampling: str = "without_replacement"
    method: str = "rdp"

    def __post_init__(self):
        validate.non_negative("noise_multiplier", self.noise_multiplier)
        validate.positive("num_clients", self.num_clients, integer=True)
        validate.clients_per_round(self.clients_per_round, self.num_clients)
        check_delta(self.delta)
        validate.one_of("sampling", self.sampling, set(SAMPLINGS))
        validate.one_of("method", self.method, set(METHODS))
        if self.method == "pld" and self.sampling != "poisson":
            raise ValueError("method='pld' accounts for sampling='poisson' only")

    @property
    def q(self) -> float:
        return self.clients_per_round / self.num_clients

    def event(self, rounds: int):
        dpa = require_dp_accounting()
        if self.sampling == "poisson":     # add/remove one: sensitivity S
            one = dpa.PoissonSampledDpEvent(self.q, dpa.GaussianDpEvent(self.noise_multiplier))
        else:                              # replace one: sensitivity 2 S
            one = dpa.SampledWithoutReplacementDpEvent(
                self.num_clients, self.clients_per_round,
                dpa.GaussianDpEvent(self.noise_multiplier / 2))
        return dpa.SelfComposedDpEvent(one, rounds)

    def epsilon(self, rounds: int) -> float:
        """epsilon(delta) after `rounds` rounds. RDP: the one-round RDP curve is computed once and
        scaled by the rounds (what the accountant's composition does), so every evaluation costs
        the conversion only; PLD composes afresh."""
        if rounds == 0:
            return 0.0
        if self.noise_multiplier == 0:
            return math.inf
        if self.method == "rdp":
            from dp_accounting.rdp import rdp_privacy_accountant as rdp
            orders, one_round = self._rdp_one_round
            return float(rdp.compute_epsilon(orders, rounds * one_round, self.delta)[0])
        acc = _accountant(self.method, self.sampling)
        acc.compose(self.event(rounds))
        return float(acc.get_epsilon(self.delta))

    @functools.cached_property
    def _rdp_one_round(self):
        acc = _accountant("rdp", self.sampling)
        acc.compose(self.event(1))
        return acc.orders, acc.rdp

    def metrics(self, rounds: int) -> dict:
        return {"epsilon": self.epsilon(rounds), "delta": float(self.delta)}


def require_dp_accounting():
    try:
        import dp_accounting
    except ImportError as e:     # the optional extra
        raise ImportError("privacy accounting needs dp-accounting: pip install 'fedjax_lab[privacy]' "
                          "(or pip install dp-accounting)") from e
    return dp_accounting


def _accountant(method: str, sampling: str):
    dpa = require_dp_accounting()
    rel = dpa.NeighboringRelation.ADD_OR_REMOVE_ONE if sampling == "poisson" \
        else dpa.NeighboringRelation.REPLACE_ONE
    if method == "pld":
        return dpa.pld.PLDAccountant(rel)
    return dpa.rdp.RdpAccountant(neighboring_relation=rel)


def dp_aggregator(alg) -> Optional[DPMean]:
    """The DPMean an algorithm aggregates with, or None."""
    agg = getattr(getattr(alg, "setup", None), "aggregator", None)
    return agg if isinstance(agg, DPMean) else None


def accountant_for(alg, data) -> Optional[Accountant]:
    """The Accountant of an algorithm built with dp_mean (None if it has none): z, q = C / N and
    delta from its aggregator and cohort. The cohort must be uniform sampling without replacement,
    the sampling the accountant models (module docstring)."""
    agg = dp_aggregator(alg)
    if agg is None:
        return None
    cohort = alg.setup.cohort
    if cohort.sampling != "uniform":
        raise ValueError(f"privacy accounting models uniform sampling of the cohort (Cohort("
                         f"sampling='uniform')), got sampling={cohort.sampling!r}")
    require_dp_accounting()
    return Accountant(agg.noise_multiplier, data.num_clients, cohort.clients_per_round,
                      delta=agg.delta, sampling=agg.sampling, method=agg.accountant)
