"""Aggregators: stacked client updates `[C, ...]` and weights `[C]` -> one update.

    agg = make_aggregator("trimmed_mean", trim_beta=0.2)
    agg.check(clients_per_round)            # ValueError before any compilation
    delta = agg(updates, weights)           # pure, jittable, vectorized over the client axis

A weight of 0 means the client is absent (dropped straggler, padding). Any algorithm that
aggregates can take an `aggregator` name and its options (FedAvg/FedOpt/FedProx do).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

from fedjax_lab.aggregators.coordinate import (client_norms, mean, median, norm_clip, sign_vote,
                                               trimmed_mean)
from fedjax_lab.aggregators.geometric import (check_krum, geometric_median, krum, krum_scores,
                                              krum_selection, pairwise_sq_distances)
from fedjax_lab.core import validate

AGGREGATORS = {
    "mean": "weighted mean sum p_k u_k / sum p_k (FedAvg)",
    "median": "coordinate-wise median of the present clients (Yin et al. 2018)",
    "trimmed_mean": "coordinate-wise mean after dropping floor(trim_beta m) values at each end",
    "sign": "majority vote sign(sum_k sign(u_k)) (signSGD; pair it with a small server_lr)",
    "geometric_median": "weighted geometric median, gm_iters smoothed Weiszfeld steps (RFA)",
    "krum": "Krum: the update closest to its n - krum_f - 2 neighbours (Blanchard et al. 2017)",
    "multi_krum": "multi-Krum: average of the krum_m best Krum-scored updates",
    "norm_clip": "weighted mean of updates clipped to norm <= clip_norm (Sun et al. 2019)",
}


@dataclasses.dataclass(frozen=True)
class Aggregator:
    name: str
    aggregate: Callable          # (updates [C, ...], weights [C]) -> update
    check: Callable[[int], None] = lambda clients_per_round: None

    def __call__(self, updates, weights):
        return self.aggregate(updates, weights)


def make_aggregator(name: str, *, trim_beta: float = 0.1, krum_f: int = 1, krum_m: int = 1,
                    clip_norm: float = 1.0, gm_iters: int = 10) -> Aggregator:
    """Aggregator `name` (one of AGGREGATORS) with its options; bad options raise ValueError now."""
    validate.one_of("aggregator", name, AGGREGATORS)
    if name == "trimmed_mean":
        if not (validate._finite(trim_beta) and 0 <= trim_beta < 0.5):
            raise ValueError(f"trim_beta must lie in [0, 0.5), got {trim_beta!r}: trim_beta >= 0.5 "
                             "trims floor(trim_beta m) values at each end, i.e. every client")
        return Aggregator(name, functools.partial(trimmed_mean, beta=float(trim_beta)))
    if name in ("krum", "multi_krum"):
        m = 1 if name == "krum" else krum_m
        if not isinstance(krum_f, int) or isinstance(krum_f, bool) or krum_f < 0:
            raise ValueError(f"krum_f must be an integer >= 0, got {krum_f!r}")
        validate.positive("krum_m", m, integer=True)
        return Aggregator(name, functools.partial(krum, f=krum_f, m=m),
                          functools.partial(check_krum, f=krum_f, m=m))
    if name == "norm_clip":
        validate.positive("clip_norm", clip_norm)
        return Aggregator(name, functools.partial(norm_clip, clip_norm=float(clip_norm)))
    if name == "geometric_median":
        validate.positive("gm_iters", gm_iters, integer=True)
        return Aggregator(name, functools.partial(geometric_median, iters=gm_iters))
    return Aggregator(name, {"mean": mean, "median": median, "sign": sign_vote}[name])


__all__ = ["AGGREGATORS", "Aggregator", "make_aggregator", "mean", "median", "trimmed_mean",
           "sign_vote", "geometric_median", "krum", "krum_scores", "krum_selection", "norm_clip",
           "client_norms", "pairwise_sq_distances", "check_krum"]
