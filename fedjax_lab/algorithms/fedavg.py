"""FedAvg (McMahan et al., AISTATS 2017) and FedOpt (Reddi et al., ICLR 2021).

Round t, sampled clients S_t, client k starts from w_t and runs local SGD on F_k to get w_k:
    Delta_t = sum_k p_k (w_k - w_t) / sum_k p_k,    p_k = n_k (or 1)
    w_{t+1} = ServerOpt(w_t, -Delta_t)
FedAvg is ServerOpt = SGD with lr 1 (w_{t+1} = weighted mean of the w_k). FedAvgM, FedAdam,
FedYogi and FedAdagrad are SGD+momentum, Adam, Yogi and Adagrad on the pseudo-gradient -Delta_t
(Reddi et al. use eps = tau = 1e-3, b1 = 0.9, b2 = 0.99).

Stragglers (FedProx's systems heterogeneity): with `drop_stragglers=True` (FedAvg's behaviour in
the FedProx paper) clients that could not finish their work are left out of the average.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from fedjax_lab.core.evaluate import client_params_of_global
from fedjax_lab.core.local import local_train
from fedjax_lab.core.optimizers import make_optimizer
from fedjax_lab.core.rounds import (LocalWork, client_weights, init_server, participate,
                                    server_update, weighted_mean_scalar)
from fedjax_lab.core.tree import tree_num_params, tree_sub, tree_weighted_mean
from fedjax_lab.core.types import Algorithm, Model


def fedopt(model: Model, *, client_optimizer="sgd", client_lr: float = 0.01,
           client_momentum: float = 0.0, server_optimizer="sgd", server_lr: float = 1.0,
           server_momentum: float = 0.0, server_eps: float = 1e-3, clients_per_round: int = 10,
           local_steps: int = 20, epochs: Optional[int] = None, batch_size: int = 10,
           stragglers: float = 0.0, drop_stragglers: bool = True, sampling: str = "uniform",
           weighting: str = "examples", shuffle: str = "auto",
           extra_loss: Optional[Callable] = None, name: str = "fedopt") -> Algorithm:
    """FedOpt with any client and server optimizer (see module docstring).

    `extra_loss(w, w_t)` is added to every local objective (FedProx's proximal term uses it).
    """
    work = LocalWork(clients_per_round=clients_per_round, batch_size=batch_size,
                     local_steps=local_steps, epochs=epochs, stragglers=stragglers,
                     sampling=sampling, weighting=weighting, shuffle=shuffle)
    client_tx = make_optimizer(client_optimizer, client_lr, momentum=client_momentum,
                               arg="client_optimizer")
    server_tx = make_optimizer(server_optimizer, server_lr, momentum=server_momentum,
                               eps=server_eps, arg="server_optimizer")
    config = dict(algorithm=name, model=model.name, client_optimizer=_name(client_optimizer),
                  client_lr=client_lr, client_momentum=client_momentum,
                  server_optimizer=_name(server_optimizer), server_lr=server_lr,
                  server_momentum=server_momentum, server_eps=server_eps,
                  clients_per_round=clients_per_round, local_steps=local_steps, epochs=epochs,
                  batch_size=batch_size, stragglers=stragglers, drop_stragglers=drop_stragglers,
                  sampling=sampling, weighting=weighting, shuffle=shuffle)

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
        res = jax.vmap(train, in_axes=(None, None, None, 0, 0, 0))(
            w_t, data.x, data.y, part.batches.idx, part.batches.step_mask, keys)
        p = client_weights(part, work, drop_stragglers=drop_stragglers)
        delta = tree_weighted_mean(jax.vmap(tree_sub, in_axes=(0, None))(res.params, w_t), p)
        state = server_update(server_tx, state, delta)
        num_bytes = 4 * tree_num_params(w_t)
        metrics = dict(local_loss=weighted_mean_scalar(res.loss, p),
                       clients_aggregated=jnp.sum(p > 0).astype(jnp.float32),
                       bytes_down=jnp.float32(num_bytes * work.clients_per_round),
                       bytes_up=jnp.sum(p > 0).astype(jnp.float32) * num_bytes)
        return state, metrics

    return Algorithm(name=name, init=init, round=round, model=model,
                     client_params=client_params_of_global(lambda s: s.params),
                     global_params=lambda s: s.params, check=work.check, config=config)


def fedavg(model: Model, *, client_lr: float = 0.01, client_optimizer="sgd",
           client_momentum: float = 0.0, clients_per_round: int = 10, local_steps: int = 20,
           epochs: Optional[int] = None, batch_size: int = 10, stragglers: float = 0.0,
           drop_stragglers: bool = True, sampling: str = "uniform", weighting: str = "examples",
           shuffle: str = "auto") -> Algorithm:
    """FedAvg: FedOpt with server SGD at lr 1; drops stragglers by default (as in FedProx's study)."""
    return fedopt(model, client_optimizer=client_optimizer, client_lr=client_lr,
                  client_momentum=client_momentum, server_optimizer="sgd", server_lr=1.0,
                  clients_per_round=clients_per_round, local_steps=local_steps, epochs=epochs,
                  batch_size=batch_size, stragglers=stragglers, drop_stragglers=drop_stragglers,
                  sampling=sampling, weighting=weighting, shuffle=shuffle, name="fedavg")


def _name(optimizer) -> str:
    return optimizer if isinstance(optimizer, str) else "custom"
