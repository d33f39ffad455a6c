"""The one round skeleton of every algorithm that aggregates client messages into a server step:

    sample -> batches -> map clients -> message -> uplink -> attack -> aggregate -> server step -> metrics

    ids, batches, stragglers = participate(k_part, data, cohort, work)        (core/rounds.py)
    m_k    = client(w_t, batches_k, key_k)    w_k - w_t after local training (default), or a gradient
    s_k    = uplink.encode(m_k)               noise, sign, top-k, QSGD ... (core/uplink.py)
    s_k    = attack.corrupt(s_k)              Byzantine clients send what they like (attacks.py)
    Delta  = aggregator({s_k}, {p_k})         mean, median, trimmed mean, vote ... (aggregators/)
    w_{t+1} = ServerOpt(w_t, -Delta)          (a gradient message: ServerOpt(w_t, Delta))

`ServerRound.exchange` is the clients' half and the aggregate (everything up to Delta);
`step_with_exchange` adds the server step and the metrics and also returns the Exchange, for an
algorithm that needs the messages after the round (FedGen trains its generator on the sampled
clients' models). Clients may start from their own points (`w_start` rows [C, ...] instead of
w_t) and send part of their message (`send`), e.g. the head only (FedGen's share="predictor").
The aggregator is called through `Aggregator.apply`: with the round key if it `needs_key` (DP's
server noise), and its aux outputs (`has_aux`) join the metrics (adaptive clipping's S_{t+1}).

An algorithm states only what its paper adds: FedProx a proximal `objective`, noisy signSGD a
perturb-then-sign uplink and a vote, Ditto a personal update around `step` (algorithms/ditto.py).
Everything else comes from the `Setup` values, so every such algorithm composes with every
aggregator, attack, uplink and server optimizer.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from fedjax_lab.core import comm
from fedjax_lab.core.evaluate import client_params_of_global
from fedjax_lab.core.local import local_train, weighted_sum_over_clients
from fedjax_lab.core.rounds import (client_weights, init_server, participate, server_update,
                                    weighted_mean_scalar)
from fedjax_lab.core.setup import Setup
from fedjax_lab.core.tree import tree_scale, tree_sub
from fedjax_lab.core.types import Algorithm, Model


def client_keys(key, ids):
    """[C] keys of the sampled clients: fold_in(key, id), independent of who else was sampled."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(ids)


def local_delta(model: Model, optimizer, objective: Optional[Callable] = None):
    """The default client: local training from w_t on F_k (+ objective(w, w_t)); sends w_k - w_t.

    Returns client(w_t, x, y, idx [S, B], step_mask [S], key) -> (message, loss, objective)."""
    def client(w_t, x, y, idx, step_mask, key):
        extra = None if objective is None else (lambda w: objective(w, w_t))
        res = local_train(model, optimizer, extra_loss=extra)(w_t, x, y, idx, step_mask, key)
        return tree_sub(res.params, w_t), res.loss, res.objective
    return client


def map_clients(client, w_t, data, part, key, *, rows: bool = False):
    """vmap `client` over the sampled clients (w_t and the flat data shared, batches per client;
    rows=True: w_t is a stack [C, ...], a start point per client)."""
    return jax.vmap(client, in_axes=(0 if rows else None, None, None, 0, 0, 0))(
        w_t, data.x, data.y, part.batches.idx, part.batches.step_mask, client_keys(key, part.ids))


class Exchange(NamedTuple):
    """A round's clients' half and its aggregate (ServerRound.exchange)."""
    direction: Any        # Delta
    messages: Any         # m_k [C, ...] as the clients computed them (None under client_chunk)
    sent: Any             # s_k [C, ...] as the server got them: send, uplink, attack (None: chunk)
    loss: jax.Array       # [C]
    objective: jax.Array  # [C]
    weights: jax.Array    # p_k [C]
    aux: dict             # the aggregator's auxiliary outputs ({} unless has_aux)


@dataclasses.dataclass(frozen=True, eq=False)
class ServerRound:
    """The skeleton, for `model` under the resolved `setup` (see the module docstring).

    client: (w_t, x, y, idx, step_mask, key) -> (message, loss, objective); None = local_delta
    with the setup's client optimizer and `objective`. gradient_message: the message is a
    gradient (the server steps along -Delta's negation, i.e. descends on it). send(messages
    [C, ...]) -> what the clients upload, before the uplink (None: all of it). up_bytes /
    down_bytes(w_t, data) -> bytes per client up / downstream (default: the uplink's size of the
    dense model / the dense model).
    """
    model: Model
    setup: Setup
    objective: Optional[Callable] = None
    client: Optional[Callable] = None
    gradient_message: bool = False
    drop_stragglers: bool = True
    down_bytes: Optional[Callable] = None
    send: Optional[Callable] = None
    up_bytes: Optional[Callable] = None

    def __post_init__(self):
        s = self.setup
        s.aggregator.check(s.cohort.clients_per_round)
        if s.work.client_chunk is not None and (s.aggregator.name != "mean" or s.uplink.name !=
                                                "identity" or s.attack.attack != "none"):
            raise ValueError(
                f"client_chunk={s.work.client_chunk} accumulates the weighted mean chunk by chunk; "
                f"it needs aggregator 'mean', uplink 'identity' and no attack, got aggregator "
                f"{s.aggregator.name!r}, uplink {s.uplink.name!r}, attack {s.attack.attack!r}")
        if s.work.client_chunk is not None and self.send is not None:
            raise ValueError(f"client_chunk={s.work.client_chunk} sends whole messages; it needs "
                             "send=None")

    @property
    def server_tx(self):
        return self.setup.server_opt.build("server_optimizer")

    def client_fn(self):
        if self.client is not None:
            return self.client
        return local_delta(self.model, self.setup.client_opt.build("client_optimizer"),
                           self.objective)

    def check(self, data):
        self.setup.check(data)

    def init(self, key, data):
        self.check(data)
        return init_server(self.server_tx, self.model.init(key, data.x[:1]))

    def participate(self, key, data, ids=None):
        return participate(key, data, self.setup.cohort, self.setup.work, ids=ids)

    def exchange(self, w_t, data, part, *, k_train, key, w_start=None) -> Exchange:
        """The clients' half of a round for participation `part` (`data` already poisoned) and
        the aggregate: client messages from w_t (or each client from its row of w_start [C, ...],
        which its client sees as w_t), send, uplink, attack, aggregator (given the round key if
        it `needs_key`)."""
        s = self.setup
        p = client_weights(part, s.cohort, drop_stragglers=self.drop_stragglers)
        if s.work.client_chunk is not None:
            if w_start is not None:
                raise ValueError(f"client_chunk={s.work.client_chunk} starts every client from "
                                 "w_t; it needs w_start=None")
            direction, loss, objective = self._chunked_mean(w_t, data, part, k_train, p)
            return Exchange(direction, None, None, loss, objective, p, {})
        msgs, loss, objective = map_clients(self.client_fn(), w_t if w_start is None else w_start,
                                            data, part, k_train, rows=w_start is not None)
        sent = s.uplink.encode(msgs if self.send is None else self.send(msgs), key, part.ids)
        sent = s.attack.corrupt(sent, part.ids, data.num_clients, key, weights=p)
        direction, aux = s.aggregator.apply(sent, p, key)
        return Exchange(direction, msgs, sent, loss, objective, p, aux)

    def step_with_exchange(self, state, data, part, *, k_train, key, w_start=None):
        """`exchange`, the server step and the metrics (with the aggregator's aux outputs).
        Returns (state, metrics, Exchange)."""
        s = self.setup
        w_t = state.params
        ex = self.exchange(w_t, data, part, k_train=k_train, key=key, w_start=w_start)
        p = ex.weights
        state = server_update(self.server_tx, state, tree_scale(ex.direction, -1.0)
                              if self.gradient_message else ex.direction)
        num_up = jnp.sum(p > 0)
        up = s.uplink.bytes(w_t, comm.dense_bytes(w_t)) if self.up_bytes is None \
            else self.up_bytes(w_t, data)
        down = comm.dense_bytes(w_t) if self.down_bytes is None else self.down_bytes(w_t, data)
        metrics = dict(local_loss=weighted_mean_scalar(ex.loss, p),
                       local_objective=weighted_mean_scalar(ex.objective, p),
                       clients_aggregated=num_up.astype(jnp.float32),
                       **comm.round_metrics(up_per_client=up, down_per_client=down, num_up=num_up,
                                            num_down=s.cohort.clients_per_round))
        clash = sorted(set(ex.aux) & set(metrics))
        if clash:
            raise ValueError(f"aggregator {s.aggregator.name!r}: aux outputs {clash} clash with "
                             "the round's metrics")
        return state, {**metrics, **ex.aux}, ex

    def step(self, state, data, part, *, k_train, key):
        """The server's half of a round for a given participation `part`; `data` already poisoned.
        Returns (state, metrics)."""
        return self.step_with_exchange(state, data, part, k_train=k_train, key=key)[:2]

    def _chunked_mean(self, w_t, data, part, k_train, p):
        """The weighted mean of the messages, client_chunk clients at a time (LocalWork); the
        per-client losses come back as [C] vectors whose weighted mean equals the unchunked one."""
        client = self.client_fn()
        fn = lambda idx, mask, k: client(w_t, data.x, data.y, idx, mask, k)
        total = jnp.sum(p)
        sums = weighted_sum_over_clients(fn, p, part.batches.idx, part.batches.step_mask,
                                         client_keys(k_train, part.ids),
                                         chunk=self.setup.work.client_chunk)
        scale = jnp.where(total > 0, 1.0 / jnp.where(total > 0, total, 1.0), 0.0)
        direction = jax.tree.map(lambda x: x * scale.astype(x.dtype), sums[0])
        as_vector = lambda v: jnp.full(p.shape, v * scale)   # weighted_mean_scalar(., p) = v * scale
        return direction, as_vector(sums[1]), as_vector(sums[2])

    def round(self, state, data, key):
        k_part, k_train = jax.random.split(key)
        part = self.participate(k_part, data)
        return self.step(state, self.setup.attack.poison(data), part, k_train=k_train, key=key)

    def algorithm(self, name: str, config: dict) -> Algorithm:
        return Algorithm(name=name, init=self.init, round=self.round, model=self.model,
                         client_params=client_params_of_global(lambda s: s.params),
                         global_params=lambda s: s.params, check=self.check, config=config,
                         setup=self.setup, server_round=self)
