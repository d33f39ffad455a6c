"""Local top-k sparsification with per-client error feedback: the baseline of FetchSGD
(Rothchild et al., ICML 2020, Sec. 5 "local top-k"; Stich et al., NeurIPS 2018 "sparsified SGD with
memory"; Lin et al., ICLR 2018 DGC).

Round t, sampled clients i with error rows e_i (kept on the server for all N clients, [N, d]):

    client i:  a_i = g_i + e_i                 (a_i = g_i without error feedback)
               m_i = Top-k(a_i)                sends k float32 values + k int32 indices
               e_i <- a_i - m_i                (error feedback only)
    server:    u   = rho u + sum_i p_i m_i / sum_i p_i       global ("virtual") momentum
               w_{t+1} = w_t - eta u

The server step is the Setup's server optimizer on the averaged messages (a gradient): SGD with
eta = server_lr = 0.1 and rho = server_momentum = 0.9 by default, as above; any other server
optimizer (FedAdam's rule ...) takes the same mean. g_i is the client's batch gradient at w_t (or
(w_t - w_i) / client_lr after `LocalWork(local_steps)` of local training, as in FetchSGD's file).
The error of a client is stale until it is sampled again, which is what FetchSGD's server-side
error avoids when clients participate rarely. As in the official code (CommEfficient,
`_server_helper_local_topk`), the error accumulates gradients and eta is applied by the server;
the momentum is not masked (masking a dense average would zero it every round).

Shared pieces: sampling, local training, client weights and the server step are the round
skeleton's (core/skeleton.py, core/rounds.py); the top-k uplink is not `uplink.top_k`, because
its error feedback is a per-client row that lives with this algorithm.

Communication per round: up, W * 8k bytes; down, the dense model (4 d bytes) to each client.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from fedjax_lab import compression as cz
from fedjax_lab.algorithms.fetchsgd import (SKETCHED, USES, check_client_opt, client_gradients,
                                            normalized, num_params)
from fedjax_lab.extend import (Algorithm, Model, Setup, begin_round, client_params_of_global,
                               client_weights, comm, defaults, flatten, resolve, server_update,
                               tree_put, tree_scale, tree_take, validate, weighted_mean_scalar)


@struct.dataclass
class LocalTopKState:
    params: Any
    opt_state: Any            # the server optimizer's state (SGD: the momentum u)
    errors: jax.Array         # e [N, d], one error row per client (zeros without error feedback)
    round: jax.Array


@defaults(SKETCHED, uses=USES)
def local_topk(model: Model, *, k: int = 100, error_feedback: bool = True,
               setup: Setup = Setup()) -> Algorithm:
    """Local top-k (see module docstring); `error_feedback=False` drops what is not sent."""
    s = resolve(setup, local_topk)
    check_client_opt(s.client_opt)
    validate.positive("k", k, integer=True)
    server_tx = s.server_opt.build("server_optimizer")
    drop = bool(s.work.drop_stragglers)         # None: keep stragglers' partial gradients
    name = "local_topk" if error_feedback else "local_topk_no_ef"

    def check(data):
        s.check(data)
        d = num_params(model, data)
        if k > d:
            raise ValueError(f"k={k} exceeds the number of model parameters d={d}; expected k <= d")

    def init(key, data):
        check(data)
        params = model.init(key, data.x[:1])
        d = flatten(params)[0].shape[0]
        rows = data.num_clients if error_feedback else 1    # no error feedback: no client state
        return LocalTopKState(params=params, opt_state=server_tx.init(params),
                              errors=jnp.zeros((rows, d), jnp.float32),
                              round=jnp.zeros((), jnp.int32))

    def round(state, data, key):
        part, data, (k_train,) = begin_round(key, data, s)
        g, losses, objectives = client_gradients(model, s.client_opt, state.params, data, part,
                                                 k_train)
        d = g.shape[1]
        if error_feedback:
            msg, new_errors = jax.vmap(
                lambda v, e: cz.with_error_feedback(lambda a: cz.top_k(a, k), v, e))(
                    g, tree_take(state.errors, part.ids))
            errors = tree_put(state.errors, part.ids, new_errors)
        else:
            msg, errors = jax.vmap(lambda v: cz.top_k(v, k))(g), state.errors
        p = client_weights(part, s.cohort, drop_stragglers=drop)
        mean = flatten(state.params)[1](normalized(p) @ cz.to_dense(msg, d))
        state = server_update(server_tx, state, tree_scale(mean, -1.0))   # a gradient message
        num_up = jnp.sum(p > 0)
        metrics = dict(local_loss=weighted_mean_scalar(losses, p),
                       local_objective=weighted_mean_scalar(objectives, p),
                       clients_aggregated=num_up.astype(jnp.float32),
                       **comm.round_metrics(up_per_client=cz.sparse_bytes(k),
                                            down_per_client=4 * d, num_up=num_up,
                                            num_down=s.cohort.clients_per_round))
        return state.replace(errors=errors), metrics

    return Algorithm(name=name, init=init, round=round, model=model,
                     client_params=client_params_of_global(lambda st: st.params),
                     global_params=lambda st: st.params, check=check, setup=s)
