"""FedAvg (McMahan et al., AISTATS 2017) and FedOpt (Reddi et al., ICLR 2021).

Round t, sampled clients S_t, client k starts from w_t and runs local SGD on F_k to get w_k:
    Delta_t = sum_k p_k (w_k - w_t) / sum_k p_k,    p_k = n_k (or 1)
    w_{t+1} = ServerOpt(w_t, -Delta_t)
FedAvg is ServerOpt = SGD with lr 1 (w_{t+1} = weighted mean of the w_k). FedAvgM is SGD with
momentum on the pseudo-gradient -Delta_t. FedAdam, FedYogi and FedAdagrad follow Reddi et al.'s
Algorithm 2 (`core.optimizers`): m_t = b1 m_{t-1} + (1 - b1) Delta_t, v_t by the Adam / Yogi /
Adagrad rule from v_{-1} = tau^2, w_{t+1} = w_t + eta m_t / (sqrt(v_t) + tau), no bias correction
(tau = server_eps = 1e-3, b1 = 0.9, b2 = 0.99). Paper vs. optax: optax's bias-corrected Adam and
Yogi and its Adagrad (no momentum, accumulator from 0.1, eps inside the root) are
server_optimizer="adam", "yogi", "adagrad"; the paper's rules are "fedadam", "fedyogi", "fedadagrad".

Stragglers (FedProx's systems heterogeneity): with `drop_stragglers=True` (FedAvg's behaviour in
the FedProx paper) clients that could not finish their work are left out of the average.

Robust aggregation and attacks compose with all of these: `aggregator` replaces the weighted mean
in Delta_t by any rule of `fedjax_lab.aggregators` (median, trimmed_mean, geometric_median, krum,
...; zero-weight clients are absent), and `attack` lets a fixed set of round(attack_fraction * N)
malicious clients (`fedjax_lab.attacks`) corrupt their w_k - w_t (sign_flip, gaussian, scaled,
alie) or train on flipped labels (label_flip). The defaults (mean, none) are plain FedOpt.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from fedjax_lab import attacks as attacks_lib
from fedjax_lab import aggregators
from fedjax_lab.core import comm
from fedjax_lab.core.evaluate import client_params_of_global
from fedjax_lab.core.local import local_train
from fedjax_lab.core.optimizers import make_optimizer
from fedjax_lab.core.rounds import (LocalWork, client_weights, init_server, participate,
                                    server_update, weighted_mean_scalar)
from fedjax_lab.core.tree import tree_sub
from fedjax_lab.core.types import Algorithm, Model


def fedopt(model: Model, *, client_optimizer="sgd", client_lr: float = 0.01,
           client_momentum: float = 0.0, server_optimizer="sgd", server_lr: float = 1.0,
           server_momentum: float = 0.0, server_eps: float = 1e-3, clients_per_round: int = 10,
           local_steps: int = 20, epochs: Optional[int] = None, batch_size: int = 10,
           stragglers: float = 0.0, drop_stragglers: bool = True, sampling: str = "uniform",
           weighting: str = "examples", shuffle: str = "auto", aggregator: str = "mean",
           trim_beta: float = 0.1, krum_f: int = 1, krum_m: int = 1, clip_norm: float = 1.0,
           gm_iters: int = 10, attack: str = "none", attack_fraction: float = 0.0,
           attack_scale: Optional[float] = None, attack_seed: int = 0,
           extra_loss: Optional[Callable] = None, name: str = "fedopt") -> Algorithm:
    """FedOpt with any client and server optimizer (see module docstring).

    `extra_loss(w, w_t)` is added to every local objective (FedProx's proximal term uses it).
    `aggregator` (+ trim_beta, krum_f, krum_m, clip_norm, gm_iters) picks the rule that combines
    the w_k - w_t; `attack`, `attack_fraction`, `attack_scale`, `attack_seed` set up attackers.
    """
    work = LocalWork(clients_per_round=clients_per_round, batch_size=batch_size,
                     local_steps=local_steps, epochs=epochs, stragglers=stragglers,
                     sampling=sampling, weighting=weighting, shuffle=shuffle)
    client_tx = make_optimizer(client_optimizer, client_lr, momentum=client_momentum,
                               arg="client_optimizer")
    server_tx = make_optimizer(server_optimizer, server_lr, momentum=server_momentum,
                               eps=server_eps, arg="server_optimizer")
    opts = {"trimmed_mean": dict(beta=trim_beta), "krum": dict(f=krum_f),
            "multi_krum": dict(f=krum_f, m=krum_m), "norm_clip": dict(clip_norm=clip_norm),
            "geometric_median": dict(iters=gm_iters)}.get(aggregator, {})
    agg = aggregators.get(aggregator, **opts)
    agg.check(clients_per_round)
    adversary = attacks_lib.Adversary(attack, attack_fraction, attack_scale, attack_seed)
    config = dict(algorithm=name, model=model.name, client_optimizer=_name(client_optimizer),
                  client_lr=client_lr, client_momentum=client_momentum,
                  server_optimizer=_name(server_optimizer), server_lr=server_lr,
                  server_momentum=server_momentum, server_eps=server_eps,
                  clients_per_round=clients_per_round, local_steps=local_steps, epochs=epochs,
                  batch_size=batch_size, stragglers=stragglers, drop_stragglers=drop_stragglers,
                  sampling=sampling, weighting=weighting, shuffle=shuffle, aggregator=aggregator,
                  attack=attack, attack_fraction=attack_fraction)
    config.update({"trim_beta": trim_beta} if aggregator == "trimmed_mean" else {})
    config.update({"krum_f": krum_f, "krum_m": krum_m} if "krum" in aggregator else {})
    config.update({"clip_norm": clip_norm} if aggregator == "norm_clip" else {})
    config.update({"gm_iters": gm_iters} if aggregator == "geometric_median" else {})
    config.update(adversary.config())

    def init(key, data):
        work.check(data)
        return init_server(server_tx, model.init(key, data.x[:1]))

    def round(state, data, key):
        k_part, k_train = jax.random.split(key)
        part = participate(k_part, data, work)
        w_t = state.params
        extra = None if extra_loss is None else (lambda w: extra_loss(w, w_t))
        train = local_train(model, client_tx, extra_loss=extra)
        keys = jax.vmap(lambda i: jax.random.fold_in(k_train, i))(part.ids)
        train_data = adversary.poison(data)
        res = jax.vmap(train, in_axes=(None, None, None, 0, 0, 0))(
            w_t, train_data.x, train_data.y, part.batches.idx, part.batches.step_mask, keys)
        p = client_weights(part, work, drop_stragglers=drop_stragglers)
        deltas = jax.vmap(tree_sub, in_axes=(0, None))(res.params, w_t)
        deltas = adversary.corrupt(deltas, part.ids, data.num_clients, key, weights=p)
        state = server_update(server_tx, state, agg(deltas, p))
        num_up = jnp.sum(p > 0)
        metrics = dict(local_loss=weighted_mean_scalar(res.loss, p),
                       local_objective=weighted_mean_scalar(res.objective, p),
                       clients_aggregated=num_up.astype(jnp.float32),
                       **comm.round_metrics(up_per_client=comm.dense_bytes(w_t),
                                            down_per_client=comm.dense_bytes(w_t), num_up=num_up,
                                            num_down=work.clients_per_round))
        return state, metrics

    return Algorithm(name=name, init=init, round=round, model=model,
                     client_params=client_params_of_global(lambda s: s.params),
                     global_params=lambda s: s.params, check=work.check, config=config)


def fedavg(model: Model, *, client_lr: float = 0.01, client_optimizer="sgd",
           client_momentum: float = 0.0, clients_per_round: int = 10, local_steps: int = 20,
           epochs: Optional[int] = None, batch_size: int = 10, stragglers: float = 0.0,
           drop_stragglers: bool = True, sampling: str = "uniform", weighting: str = "examples",
           shuffle: str = "auto", aggregator: str = "mean", trim_beta: float = 0.1, krum_f: int = 1,
           krum_m: int = 1, clip_norm: float = 1.0, gm_iters: int = 10, attack: str = "none",
           attack_fraction: float = 0.0, attack_scale: Optional[float] = None,
           attack_seed: int = 0) -> Algorithm:
    """FedAvg: FedOpt with server SGD at lr 1; drops stragglers by default (as in FedProx's study)."""
    return fedopt(model, client_optimizer=client_optimizer, client_lr=client_lr,
                  client_momentum=client_momentum, server_optimizer="sgd", server_lr=1.0,
                  clients_per_round=clients_per_round, local_steps=local_steps, epochs=epochs,
                  batch_size=batch_size, stragglers=stragglers, drop_stragglers=drop_stragglers,
                  sampling=sampling, weighting=weighting, shuffle=shuffle, aggregator=aggregator,
                  trim_beta=trim_beta, krum_f=krum_f, krum_m=krum_m, clip_norm=clip_norm,
                  gm_iters=gm_iters, attack=attack, attack_fraction=attack_fraction,
                  attack_scale=attack_scale, attack_seed=attack_seed, name="fedavg")


def _name(optimizer) -> str:
    return optimizer if isinstance(optimizer, str) else "custom"
