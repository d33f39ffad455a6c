"""Aggregators: stacked client updates `[C, ...]` and weights `[C]` -> one update.

Each is a frozen value built by its factory, validated at once and describing itself:

    agg = aggregators.trimmed_mean(beta=0.2)   # or get("trimmed_mean", beta=0.2)
    agg.check(clients_per_round)            # ValueError before any compilation
    delta = agg(updates, weights)           # pure, jittable, vectorized over the client axis
    agg.describe()                          # {"aggregator": "trimmed_mean", "aggregator_beta": 0.2}

A weight of 0 means the client is absent (dropped straggler, padding). Every algorithm that
aggregates takes one in its `Setup` (core/setup.py); the CLI's `--aggregator NAME` offers the
options of NAME's factory as `--aggregator-OPTION`. The plain functions live in `coordinate` and
`geometric`.
"""
from __future__ import annotations

import inspect

from fedjax_lab.aggregators import coordinate, geometric
from fedjax_lab.aggregators.base import Aggregator
from fedjax_lab.aggregators.privacy import dp_mean as private_mean
from fedjax_lab.core import validate, values
from fedjax_lab.core.setup import ValueKind, register_value_kind


def mean() -> Aggregator:
    """Weighted mean sum_k p_k u_k / sum_k p_k (FedAvg)."""
    return Aggregator("mean", coordinate.mean)


def median() -> Aggregator:
    """Coordinate-wise median of the present clients (Yin et al., ICML 2018)."""
    return Aggregator("median", coordinate.median)


def trimmed_mean(beta: float = 0.1) -> Aggregator:
    """Coordinate-wise mean after dropping floor(beta m) of the m present values at each end."""
    if not values.is_traced(beta) and not (validate._finite(beta) and 0 <= beta < 0.5):
        raise ValueError(f"trimmed_mean: beta must lie in [0, 0.5), got {beta!r}: beta >= 0.5 "
                         "trims floor(beta m) values at each end, i.e. every client")
    return Aggregator("trimmed_mean", lambda u, w: coordinate.trimmed_mean(u, w, beta=beta),
                      options=(("beta", beta),))


def sign() -> Aggregator:
    """Majority vote sign(sum_k sign(u_k)) (signSGD)."""
    return Aggregator("sign", coordinate.sign_vote)


def geometric_median(iters: int = 10) -> Aggregator:
    """Weighted geometric median by `iters` smoothed Weiszfeld steps (RFA, Pillutla et al.)."""
    validate.positive("geometric_median: iters", iters, integer=True)
    return Aggregator("geometric_median",
                      lambda u, w: geometric.geometric_median(u, w, iters=iters),
                      options=(("iters", iters),))


def krum(f: int = 1) -> Aggregator:
    """Krum: the update closest to its n - f - 2 nearest neighbours (Blanchard et al. 2017)."""
    return multi_krum(f=f, m=1, _name="krum")


def multi_krum(f: int = 1, m: int = 1, *, _name: str = "multi_krum") -> Aggregator:
    """Multi-Krum: the plain average of the m best Krum-scored updates."""
    if not isinstance(f, int) or isinstance(f, bool) or f < 0:
        raise ValueError(f"{_name}: f (aggregator_f, the number of attackers tolerated) must be "
                         f"an integer >= 0, got {f!r}")
    validate.positive(f"{_name}: m (aggregator_m)", m, integer=True)
    opts = (("f", f),) if _name == "krum" else (("f", f), ("m", m))
    return Aggregator(_name, lambda u, w: geometric.krum(u, w, f=f, m=m),
                      lambda n: geometric.check_krum(n, f=f, m=m), options=opts)


def norm_clip(clip_norm: float = 1.0) -> Aggregator:
    """Weighted mean of updates clipped to norm <= clip_norm (Sun et al. 2019)."""
    validate.positive("norm_clip: clip_norm", clip_norm)
    return Aggregator("norm_clip", lambda u, w: coordinate.norm_clip(u, w, clip_norm=clip_norm),
                      options=(("clip_norm", clip_norm),))


AGGREGATORS = {
    "mean": (mean, "weighted mean sum p_k u_k / sum p_k (FedAvg)"),
    "median": (median, "coordinate-wise median of the present clients (Yin et al. 2018)"),
    "trimmed_mean": (trimmed_mean, "coordinate-wise mean after dropping floor(beta m) values at each end"),
    "sign": (sign, "majority vote sign(sum_k sign(u_k)) (signSGD; pair it with a small server lr)"),
    "geometric_median": (geometric_median, "weighted geometric median, `iters` smoothed Weiszfeld steps (RFA)"),
    "krum": (krum, "Krum: the update closest to its n - f - 2 neighbours (Blanchard et al. 2017)"),
    "multi_krum": (multi_krum, "multi-Krum: average of the m best Krum-scored updates"),
    "norm_clip": (norm_clip, "weighted mean of updates clipped to norm <= clip_norm (Sun et al. 2019)"),
}


def dp_mean(noise_multiplier: float = 1.0, clip_norm: float = 1.0, expected_clients: int = 0,
            delta: float = 1e-5, sampling: str = "without_replacement", accountant: str = "rdp"):
    """DP-FedAvg (McMahan et al. 2018): (sum_k clip_S(u_k) + N(0, (z S)^2 I)) / m, m the expected
    cohort size (0: the cohort's C); epsilon(delta) by dp-accounting (aggregators/privacy.py)."""
    return private_mean(noise_multiplier, clip_norm, expected_clients, delta, sampling, accountant)


AGGREGATORS["dp_mean"] = (dp_mean, "DP-FedAvg (McMahan et al. 2018): sum of updates clipped to "
                          "norm S + N(0, (z S)^2), over the expected cohort size")


def options(name: str):
    """[(option, type, default)] of aggregator `name`'s factory (the CLI's --aggregator-OPTION)."""
    validate.one_of("aggregator", name, AGGREGATORS)
    out = []
    for p in inspect.signature(AGGREGATORS[name][0]).parameters.values():
        if not p.name.startswith("_"):
            out.append((p.name, values.scalar_type(None, p.default), p.default))
    return out


def get(name_or_agg, **opts) -> Aggregator:
    """An Aggregator from a name and its options (or an Aggregator, unchanged)."""
    if isinstance(name_or_agg, Aggregator):
        return name_or_agg
    validate.one_of("aggregator", name_or_agg, AGGREGATORS)
    valid = {o for o, _, _ in options(name_or_agg)}
    unknown = sorted(set(opts) - valid)
    if unknown:
        raise ValueError(f"aggregator {name_or_agg!r} has no option(s) {unknown}; its options: "
                         f"{sorted(valid) or 'none'}")
    return AGGREGATORS[name_or_agg][0](**opts)


__all__ = ["AGGREGATORS", "Aggregator", "get", "options", "mean", "median", "trimmed_mean", "sign",
           "geometric_median", "krum", "multi_krum", "norm_clip", "coordinate", "geometric"]


register_value_kind("aggregator", ValueKind(Aggregator, mean, get))
