"""Local top-k sparsification with per-client error feedback: the baseline of FetchSGD
(Rothchild et al., ICML 2020, Sec. 5 "local top-k"; Stich et al., NeurIPS 2018 "sparsified SGD with
memory"; Lin et al., ICLR 2018 DGC).

Round t, sampled clients i with error rows e_i (kept on the server for all N clients, [N, d]):

    client i:  a_i = g_i + e_i                 (a_i = g_i without error feedback)
               m_i = Top-k(a_i)                sends k float32 values + k int32 indices
               e_i <- a_i - m_i                (error feedback only)
    server:    u   = rho u + sum_i p_i m_i / sum_i p_i       global ("virtual") momentum
               w_{t+1} = w_t - eta u

g_i is the client's batch gradient at w_t (or (w_t - w_i) / client_lr after `local_steps` of SGD,
as in FetchSGD's file). The error of a client is stale until it is sampled again, which is what
FetchSGD's server-side error avoids when clients participate rarely. As in the official code
(CommEfficient, `_server_helper_local_topk`), the error accumulates gradients and eta is applied
by the server; the momentum is not masked (masking a dense average would zero it every round).

Communication per round: up, W * 8k bytes; down, the dense model (4 d bytes) to each client.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from fedjax_lab import compression as cz
from fedjax_lab.algorithms.fetchsgd import client_gradients, normalized
from fedjax_lab.core import comm, validate
from fedjax_lab.core.evaluate import client_params_of_global
from fedjax_lab.core.rounds import LocalWork, client_weights, participate, weighted_mean_scalar
from fedjax_lab.core.tree import flatten, tree_put, tree_take
from fedjax_lab.core.types import Algorithm, Model


@struct.dataclass
class LocalTopKState:
    params: Any
    velocity: jax.Array       # u [d], server momentum
    errors: jax.Array         # e [N, d], one error row per client (zeros without error feedback)
    round: jax.Array


def local_topk(model: Model, *, lr: float = 0.1, momentum: float = 0.9, k: int = 100,
               error_feedback: bool = True, clients_per_round: int = 10, local_steps: int = 1,
               client_lr: float = 1.0, batch_size: int = 10, sampling: str = "uniform",
               weighting: str = "uniform", shuffle: str = "auto") -> Algorithm:
    """Local top-k (see module docstring); `error_feedback=False` drops what is not sent."""
    validate.positive("lr", lr)
    validate.fraction("momentum", momentum, closed_right=False)
    validate.positive("k", k, integer=True)
    validate.positive("client_lr", client_lr)
    work = LocalWork(clients_per_round=clients_per_round, batch_size=batch_size,
                     local_steps=local_steps, sampling=sampling, weighting=weighting,
                     shuffle=shuffle)
    name = "local_topk" if error_feedback else "local_topk_no_ef"
    config = dict(algorithm="local_topk", model=model.name, lr=lr, momentum=momentum, k=k,
                  error_feedback=error_feedback, clients_per_round=clients_per_round,
                  local_steps=local_steps, client_lr=client_lr, batch_size=batch_size,
                  sampling=sampling, weighting=weighting, shuffle=shuffle)

    def check(data):
        work.check(data)
        params = jax.eval_shape(model.init, jax.random.key(0), data.x[:1])
        d = sum(int(x.size) for x in jax.tree.leaves(params))
        if k > d:
            raise ValueError(f"k={k} exceeds the number of model parameters d={d}; expected k <= d")

    def init(key, data):
        check(data)
        params = model.init(key, data.x[:1])
        d = flatten(params)[0].shape[0]
        rows = data.num_clients if error_feedback else 1    # no error feedback: no client state
        return LocalTopKState(params=params, velocity=jnp.zeros(d, jnp.float32),
                              errors=jnp.zeros((rows, d), jnp.float32),
                              round=jnp.zeros((), jnp.int32))

    def round(state, data, key):
        k_part, k_train = jax.random.split(key)
        part = participate(k_part, data, work)
        g, losses = client_gradients(model, work, client_lr, state.params, data, part, k_train)
        d = g.shape[1]
        if error_feedback:
            msg, new_errors = jax.vmap(
                lambda v, e: cz.with_error_feedback(lambda a: cz.top_k(a, k), v, e))(
                    g, tree_take(state.errors, part.ids))
            errors = tree_put(state.errors, part.ids, new_errors)
        else:
            msg, errors = jax.vmap(lambda v: cz.top_k(v, k))(g), state.errors
        p = client_weights(part, work, drop_stragglers=False)
        mean = normalized(p) @ cz.to_dense(msg, d)
        velocity = momentum * state.velocity + mean
        flat, unravel = flatten(state.params)
        num_up = jnp.sum(p > 0)
        metrics = dict(local_loss=weighted_mean_scalar(losses, p),
                       clients_aggregated=num_up.astype(jnp.float32),
                       **comm.round_metrics(up_per_client=cz.sparse_bytes(k),
                                            down_per_client=4 * d, num_up=num_up,
                                            num_down=work.clients_per_round))
        return state.replace(params=unravel(flat - lr * velocity), velocity=velocity,
                             errors=errors, round=state.round + 1), metrics

    return Algorithm(name=name, init=init, round=round, model=model,
                     client_params=client_params_of_global(lambda s: s.params),
                     global_params=lambda s: s.params, check=check, config=config)
