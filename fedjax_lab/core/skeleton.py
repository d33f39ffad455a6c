"""The one round skeleton of every algorithm that aggregates client messages into a server step:

    sample -> batches -> map clients -> message -> uplink -> attack -> aggregate -> server step -> metrics

    ids, batches, stragglers = participate(k_part, data, cohort, work)        (core/rounds.py)
    m_k    = client(w_t, batches_k, key_k)    w_k - w_t after local training (default), or a gradient
    s_k    = uplink.encode(m_k)               noise, sign, top-k, QSGD ... (uplink.py)
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

Hooks, for an algorithm with its own client or server rule (each optional; the skeleton still
does sampling, batches, the map over clients, uplink, attack, aggregation, the server step, the
metrics and the byte accounting; `fedjax_lab.extend` is the writers' surface):

    local_objective(w, ctx)               a term of the local objective; ctx = ClientContext
                                          (w_t, row, extra): FedDyn's -<g_k, w> + a/2||w - w_t||^2
    batch_objective(w, xb, yb, rng, ctx)  a term of the step's batch (MOON's contrastive loss)
    message(res, ctx) -> m_k              what the client sends (default res.params - w_t);
                                          ctx.batches gives `mean_loss` its data (q-FFL's F_k)
    init_row(params) / new_row(res, ctx)  a per-client row for all N clients (SCAFFOLD's c_i,
                                          FedDyn's gradient state, MOON's previous model); a row
                                          is rewritten only for clients that reported (p_k > 0)
    start(w_t, row) -> w                  where the client starts and what it deploys (FedBN: w_t
                                          with its own BatchNorm layers); the algorithm is then
                                          personalized: client_params = start(w_t, row_k)
    local_split(params) -> (shared, local)  a part of the model stays on each client (FedBN's
                                          BatchNorm layers, FedPer's head, LG-FedAvg's body): the
                                          skeleton derives start, message, the rows and the
                                          server's direction (zero on the local part) from it
    client_tx(tx) -> tx                   the algorithm's own wrap of the client optimizer
                                          (FedRep's phases, FedBABU's frozen head); config.json
                                          keeps the setup's optimizer
    init_extra(params) / server_rule(ex, extra, num_clients) -> (direction, extra)
                                          extra server state and the rule from the round's
                                          Exchange to the direction the server optimizer takes
                                          (SCAFFOLD's c, FedDyn's h, FedNova's tau_eff, q-FFL)
    send_extra                            the extra state travels down with w_t (its bytes count)

With rows, the state is ClientRows(server, rows [N, ...]) (core/client_state.py) and the round
also runs with the rows in a host store; the mesh's padding of the cohort is done here, once.

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
from flax import traverse_util

from fedjax_lab.core import comm
from fedjax_lab.core.client_state import RowRound, row_algorithm
from fedjax_lab.core.evaluate import client_params_of_global
from fedjax_lab.core.local import local_train, weighted_sum_over_clients
from fedjax_lab.core.rounds import (client_weights, init_server, participate, sample_ids,
                                    server_update, weighted_mean_scalar)
from fedjax_lab.core.setup import Setup, algorithm_config, resolve
from fedjax_lab.core.tree import tree_broadcast, tree_scale, tree_sub
from fedjax_lab.core.types import Algorithm, Model, batch_loss


def client_keys(key, ids):
    """[C] keys of the sampled clients: fold_in(key, id), independent of who else was sampled."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(ids)


class ClientBatches(NamedTuple):
    """A client's data for the round: the flat arrays and its [S, B] batch indices and [S] mask."""
    x: Any
    y: Any
    idx: jax.Array
    step_mask: jax.Array


class ClientContext(NamedTuple):
    """What a client's hooks see: the model sent down, its own row, the server's extra state and
    (in `message` / `new_row`) its batches of the round."""
    w_t: Any
    row: Any = None
    extra: Any = None
    batches: Optional[ClientBatches] = None


def mean_loss(model: Model, params, ctx: ClientContext):
    """The client's mean data loss at `params` over the batches of its real steps (eval mode):
    F_k(params) estimated on what it drew this round (q-FFL's F_k(w_t))."""
    b = ctx.batches
    losses = jax.vmap(lambda rows: batch_loss(model, params, b.x[rows], b.y[rows], train=False))(b.idx)
    n = jnp.sum(b.step_mask)
    return jnp.sum(jnp.where(b.step_mask, losses, 0.0)) / jnp.maximum(n, 1)


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
    num_steps: Any = None  # [C] local steps each client took
    new_rows: Any = None   # [C, ...] the clients' new rows (None without rows)


@dataclasses.dataclass(frozen=True, eq=False)
class ServerRound:
    """The skeleton, for `model` under the resolved `setup` (see the module docstring).

    client: (w_t, x, y, idx, step_mask, key) -> (message, loss, objective); None = local training
    with the setup's client optimizer on F_k + objective(w, w_t) + the hooks' terms, sending
    `message` (w_k - w_t by default). gradient_message: the message is a gradient (the server
    steps along -Delta's negation, i.e. descends on it). send(messages [C, ...]) -> what the
    clients upload, before the uplink (None: all of it). up_bytes / down_bytes(w_t, data) ->
    bytes per client up / downstream (default: the uplink's size of the message / the dense model,
    plus the extra state when `send_extra`). The hooks are those of the module docstring.
    """
    model: Model
    setup: Setup
    objective: Optional[Callable] = None
    client: Optional[Callable] = None
    gradient_message: bool = False
    drop_stragglers: Optional[bool] = None   # None: the setup's LocalWork.drop_stragglers
    down_bytes: Optional[Callable] = None
    send: Optional[Callable] = None
    up_bytes: Optional[Callable] = None
    local_objective: Optional[Callable] = None
    batch_objective: Optional[Callable] = None
    message: Optional[Callable] = None
    init_row: Optional[Callable] = None
    new_row: Optional[Callable] = None
    init_extra: Optional[Callable] = None
    server_rule: Optional[Callable] = None
    send_extra: bool = False
    start: Optional[Callable] = None
    local_split: Optional[Callable] = None
    client_tx: Optional[Callable] = None

    def __post_init__(self):
        if self.local_split is not None:
            self._derive_from_local_split()
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
        if s.work.client_chunk is not None and self.has_rows:
            raise ValueError(f"client_chunk={s.work.client_chunk} keeps no per-client rows; it "
                             "needs init_row=None")
        hooks = [h for h in ("local_objective", "batch_objective", "message", "init_row",
                             "new_row") if getattr(self, h) is not None]
        if self.client is not None and hooks:
            raise ValueError(f"a custom client computes its own message; it takes none of the "
                             f"client hooks, got {hooks}")
        if (self.init_row is None) != (self.new_row is None):
            raise ValueError("per-client rows need both init_row and new_row")
        if self.start is not None and not self.has_rows:
            raise ValueError("start(w_t, row) needs per-client rows (init_row and new_row)")

    def _derive_from_local_split(self):
        """The hooks of a model split into a shared part and a per-client local part."""
        given = [h for h in ("start", "message", "init_row", "new_row")
                 if getattr(self, h) is not None]
        if given:
            raise ValueError(f"local_split derives {given}; give local_split or those hooks")
        shared = lambda w: self.local_split(w)[0]
        local = lambda w: self.local_split(w)[1]
        rule = self.server_rule or (lambda ex, extra, n: (ex.direction, extra))

        def server_rule(ex, extra, num_clients):     # the local part's direction is zero
            direction, extra = rule(ex, extra, num_clients)
            zeros = jax.tree.map(lambda r: jnp.zeros_like(r[0]), ex.new_rows)
            return merge_trees(direction, zeros), extra
        hooks = dict(start=lambda w_t, row: merge_trees(shared(w_t), row),
                     message=lambda res, ctx: shared(tree_sub(res.params, ctx.w_t)),
                     init_row=local, new_row=lambda res, ctx: local(res.params),
                     server_rule=server_rule)
        if self.down_bytes is None:
            hooks["down_bytes"] = lambda w_t, data: comm.dense_bytes(shared(w_t))
        for name, fn in hooks.items():
            object.__setattr__(self, name, fn)

    @property
    def has_rows(self) -> bool:
        return self.init_row is not None

    @property
    def server_tx(self):
        return self.setup.server_opt.build("server_optimizer")

    def client_fn(self):
        """(w_t, x, y, idx, step_mask, key[, row, extra]) -> (message, loss, objective, new_row)."""
        if self.client is not None:
            return lambda *a: (*self.client(*a[:6]), None)
        objective, local_obj = self.objective, self.local_objective

        def regularizer(w, ctx):
            out = 0.0 if objective is None else objective(w, ctx.w_t)
            return out if local_obj is None else out + local_obj(w, ctx)
        extra = None if objective is None and local_obj is None else regularizer
        batch = self.batch_objective
        tx = self.setup.client_opt.build("client_optimizer")
        train = local_train(self.model, tx if self.client_tx is None else self.client_tx(tx),
                            extra_loss=extra, extra_batch_loss=None if batch is None else (
                                lambda w, xb, yb, rng, ctx: batch(w, xb, yb, rng, ctx)))

        def client(w_t, x, y, idx, step_mask, key, row=None, extra_state=None):
            anchor = ClientContext(w_t, row, extra_state)
            w_0 = w_t if self.start is None else self.start(w_t, row)
            res = train(w_0, x, y, idx, step_mask, key, anchor=anchor)
            ctx = anchor._replace(batches=ClientBatches(x, y, idx, step_mask))
            msg = tree_sub(res.params, w_t) if self.message is None else self.message(res, ctx)
            new = None if self.new_row is None else self.new_row(res, ctx)
            return msg, res.loss, res.objective, new
        return client

    @property
    def drops_stragglers(self) -> bool:
        """Whether stragglers' partial work is left out of the aggregate: `drop_stragglers` if
        given, else the setup's LocalWork.drop_stragglers (None there: True)."""
        if self.drop_stragglers is not None:
            return self.drop_stragglers
        return self.setup.work.drop_stragglers is not False

    def check(self, data):
        self.setup.check(data)

    def init_state(self, key, data):
        """The server state: w_0, the server optimizer's state and the extra state (if any)."""
        self.check(data)
        params = self.model.init(key, data.x[:1])
        state = init_server(self.server_tx, params)
        return state if self.init_extra is None else state.replace(extra=self.init_extra(params))

    def init(self, key, data):
        return self.init_state(key, data)

    def participate(self, key, data, ids=None):
        return participate(key, data, self.setup.cohort, self.setup.work, ids=ids)

    def exchange(self, w_t, data, part, *, k_train, key, w_start=None, rows=None,
                 extra=None) -> Exchange:
        """The clients' half of a round for participation `part` (`data` already poisoned) and
        the aggregate: client messages from w_t (or each client from its row of w_start [C, ...],
        which its client sees as w_t), send, uplink, attack, aggregator (given the round key if
        it `needs_key`). `rows` [C, ...] are the clients' rows (padded like `part`), `extra` the
        server's extra state."""
        s = self.setup
        p = client_weights(part, s.cohort, drop_stragglers=self.drops_stragglers)
        if s.work.client_chunk is not None:
            if w_start is not None:
                raise ValueError(f"client_chunk={s.work.client_chunk} starts every client from "
                                 "w_t; it needs w_start=None")
            direction, loss, objective = self._chunked_mean(w_t, data, part, k_train, p, extra)
            return Exchange(direction, None, None, loss, objective, p, {}, part.batches.num_steps)
        client = self.client_fn()
        msgs, loss, objective, new_rows = jax.vmap(
            client, in_axes=(None if w_start is None else 0, None, None, 0, 0, 0, 0, None))(
            w_t if w_start is None else w_start, data.x, data.y, part.batches.idx,
            part.batches.step_mask, client_keys(k_train, part.ids), rows, extra)
        sent = s.uplink.encode(msgs if self.send is None else self.send(msgs), key, part.ids)
        sent = s.attack.corrupt(sent, part.ids, data.num_clients, key, weights=p)
        direction, aux = s.aggregator.apply(sent, p, key)
        if new_rows is not None:      # a client that did not report keeps its row
            new_rows = jax.tree.map(lambda n, o: jnp.where(
                (p > 0).reshape((-1,) + (1,) * (n.ndim - 1)), n, o), new_rows, rows)
        return Exchange(direction, msgs, sent, loss, objective, p, aux, part.batches.num_steps,
                        new_rows)

    def step_with_exchange(self, state, data, part, *, k_train, key, w_start=None, rows=None):
        """`exchange`, the server rule, the server step and the metrics (with the aggregator's
        aux outputs). Returns (state, metrics, Exchange)."""
        s = self.setup
        w_t, extra = state.params, state.extra
        ex = self.exchange(w_t, data, part, k_train=k_train, key=key, w_start=w_start, rows=rows,
                           extra=extra)
        p = ex.weights
        direction = ex.direction
        if self.server_rule is not None:
            direction, extra = self.server_rule(ex, extra, data.num_clients)
        state = server_update(self.server_tx, state, tree_scale(direction, -1.0)
                              if self.gradient_message else direction)
        if self.init_extra is not None:
            state = state.replace(extra=extra)
        num_up = jnp.sum(p > 0)
        metrics = dict(local_loss=weighted_mean_scalar(ex.loss, p),
                       local_objective=weighted_mean_scalar(ex.objective, p),
                       clients_aggregated=num_up.astype(jnp.float32),
                       **comm.round_metrics(up_per_client=self._up_bytes(w_t, data, ex),
                                            down_per_client=self._down_bytes(w_t, data, extra),
                                            num_up=num_up,
                                            num_down=s.cohort.clients_per_round))
        clash = sorted(set(ex.aux) & set(metrics))
        if clash:
            raise ValueError(f"aggregator {s.aggregator.name!r}: aux outputs {clash} clash with "
                             "the round's metrics")
        return state, {**metrics, **ex.aux}, ex

    def _up_bytes(self, w_t, data, ex):
        if self.up_bytes is not None:
            return self.up_bytes(w_t, data)
        template = w_t
        if ex.messages is not None and (self.message is not None or self.client is not None):
            template = jax.tree.map(lambda m: m[0], ex.messages if self.send is None
                                    else self.send(ex.messages))
        return self.setup.uplink.bytes(template, comm.dense_bytes(template))

    def _down_bytes(self, w_t, data, extra):
        if self.down_bytes is not None:
            return self.down_bytes(w_t, data)
        return comm.dense_bytes(w_t) + (comm.dense_bytes(extra) if self.send_extra else 0)

    def step(self, state, data, part, *, k_train, key):
        """The server's half of a round for a given participation `part`; `data` already poisoned.
        Returns (state, metrics)."""
        return self.step_with_exchange(state, data, part, k_train=k_train, key=key)[:2]

    def _chunked_mean(self, w_t, data, part, k_train, p, extra=None):
        """The weighted mean of the messages, client_chunk clients at a time (LocalWork); the
        per-client losses come back as [C] vectors whose weighted mean equals the unchunked one."""
        client = self.client_fn()
        fn = lambda idx, mask, k: client(w_t, data.x, data.y, idx, mask, k, None, extra)[:3]
        total = jnp.sum(p)
        sums = weighted_sum_over_clients(fn, p, part.batches.idx, part.batches.step_mask,
                                         client_keys(k_train, part.ids),
                                         chunk=self.setup.work.client_chunk)
        scale = jnp.where(total > 0, 1.0 / jnp.where(total > 0, total, 1.0), 0.0)
        direction = jax.tree.map(lambda x: x * scale.astype(x.dtype), sums[0])
        as_vector = lambda v: jnp.full(p.shape, v * scale)   # weighted_mean_scalar(., p) = v * scale
        return direction, as_vector(sums[1]), as_vector(sums[2])

    def round(self, state, data, key):
        part, data, (k_train,) = begin_round(key, data, self.setup, draw=self.participate)
        return self.step(state, data, part, k_train=k_train, key=key)

    def sample(self, data, key, streams: int = 2):
        """The round's [C] client ids from its key alone (`round_ids`; RowRound.sample)."""
        return round_ids(key, data, self.setup, streams)

    def begin_rows(self, key, data, ids, rows, streams: int = 2):
        """`begin_round` over the sampled clients' rows [C, ...], for row_step and the algorithms
        with a client step of their own: (part, rows, data, keys), the rows padded to the cohort
        (a client mesh pads it with step-less dummies; `end_rows` cuts them off the new rows).
        rows = ids = None is `begin_round` (FedGen runs both of its shares through one round)."""
        part, data, keys = begin_round(key, data, self.setup, ids=ids, streams=streams,
                                       draw=self.participate)
        return part, pad_rows(rows, part.ids.shape[0]), data, keys

    @staticmethod
    def end_rows(rows, ids):
        """The new rows of the clients `ids`, without the mesh's padding (begin_rows)."""
        return jax.tree.map(lambda x: x[:ids.shape[0]], rows)

    def row_step(self, server, rows, ids, data, key):
        """A round over the sampled clients' rows [C, ...] (RowRound.step)."""
        part, rows, data, (k_train,) = self.begin_rows(key, data, ids, rows)
        server, metrics, ex = self.step_with_exchange(server, data, part, k_train=k_train,
                                                      key=key, rows=rows)
        return server, self.end_rows(ex.new_rows, ids), metrics

    def algorithm(self, name: str, config: dict) -> Algorithm:
        global_params = lambda s: s.params
        if not self.has_rows:
            return Algorithm(name=name, init=self.init, round=self.round, model=self.model,
                             client_params=client_params_of_global(global_params),
                             global_params=global_params, check=self.check, config=config,
                             setup=self.setup, server_round=self)
        if self.start is None:
            deploy = lambda server, rows: tree_broadcast(server.params,
                                                         jax.tree.leaves(rows)[0].shape[0])
        else:
            deploy = lambda server, rows: jax.vmap(self.start, in_axes=(None, 0))(server.params,
                                                                                  rows)
        spec = RowRound(init_server=self.init_state,
                        init_row=lambda server: self.init_row(server.params),
                        sample=self.sample, step=self.row_step, params=deploy)
        alg = row_algorithm(spec, name=name, model=self.model, global_params=global_params,
                            check=self.check, config=config, personalized=self.start is not None)
        return dataclasses.replace(alg, setup=self.setup, server_round=self)


def server_averaging(model: Model, setup: Setup, factory, *, objective=None,
                     drop_stragglers: bool = True, local_objective=None, batch_objective=None,
                     message=None, init_row=None, new_row=None, init_extra=None, server_rule=None,
                     send_extra: bool = False, start=None, up_bytes=None, down_bytes=None,
                     local_split=None, client_tx=None, **hparams) -> Algorithm:
    """An algorithm built on the skeleton: `setup` resolved over `factory`'s defaults, local
    training on F_k (+ objective(w, w_t)) as the client, the hooks of the module docstring, named
    after the factory. `defaults` records the factory's call in config.json; `hparams` are
    recorded too (for a factory without `defaults`; an algorithm need not pass them).
    `drop_stragglers` is the algorithm's default for LocalWork(drop_stragglers=None)."""
    s = resolve(setup, factory, drop_stragglers=drop_stragglers)
    skeleton = ServerRound(model, s, objective=objective,
                           local_objective=local_objective, batch_objective=batch_objective,
                           message=message, init_row=init_row, new_row=new_row,
                           init_extra=init_extra, server_rule=server_rule, send_extra=send_extra,
                           start=start, up_bytes=up_bytes, down_bytes=down_bytes,
                           local_split=local_split, client_tx=client_tx)
    name = factory.__name__
    return skeleton.algorithm(name, algorithm_config(name, model, s, **hparams))


def begin_round(key, data, setup: Setup, *, ids=None, streams: int = 2, cohort=None, draw=None):
    """The start of every round, written once: the round key split into `streams` keys, the first
    drawing the cohort (of the clients `ids` when the round has them already; `cohort`: the
    setup's unless given), their batches and stragglers (`draw(k, data, ids=)`: `participate`
    under the setup's cohort and local work unless given), the others returned for the round's
    own streams (streams=2: k_train); the data as the setup's attack poisons it.
    Returns (part, data, keys)."""
    k_part, *keys = jax.random.split(key, streams)
    if draw is None:
        draw = lambda k, d, ids: participate(k, d, cohort or setup.cohort, setup.work, ids=ids)
    return draw(k_part, data, ids=ids), setup.attack.poison(data), keys


def round_ids(key, data, setup: Setup, streams: int = 2):
    """The [C] client ids that `begin_round(key, ..., streams=streams)` draws, from the key alone
    (what a host store computes ahead of a round over per-client rows)."""
    return sample_ids(jax.random.split(key, streams)[0], data, setup.cohort)


def merge_trees(a, b):
    """The nested-dict params tree holding the leaves of both parts (a local_split's inverse)."""
    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(a),
                                         **traverse_util.flatten_dict(b)})


def pad_rows(rows, size: int):
    """Rows [C, ...] padded to `size` with copies of row 0 (a client mesh pads the cohort with
    step-less dummies, whose rows are then cut off again)."""
    def pad(x):
        extra = size - x.shape[0]
        return x if extra == 0 else jnp.concatenate([x, jnp.repeat(x[:1], extra, axis=0)])
    return jax.tree.map(pad, rows)
