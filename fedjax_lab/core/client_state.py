"""Stateful clients, written once: per-client rows for *all* N clients, stacked [N, ...].

A stateful algorithm (Ditto's personal models, FedAMP's client models, ...) is described by a
`RowRound`, the round written over the *sampled rows only*:

    server              = init_server(key, data)          server-side pytree
    row                 = init_row(server)                the initial row of every client (unstacked)
    ids                 = sample(data, key)               [C] client ids; depends only on (data, key)
    server, rows, m     = step(server, rows, ids, data, key)   ids = sample(data, key), rows [C, ...]
    params              = params(server, rows)            what the clients owning `rows` deploy

`row_algorithm` turns it into an ordinary `Algorithm` whose state is `ClientRows(server, rows[N])`:
a round gathers the sampled rows (`rows[ids]`), runs `step` on them (vmapped inside) and scatters
them back (`.at[ids].set`), all inside the jitted round. Because `sample` depends only on the key,
the same `RowRound` also runs with the rows in a host-side `ClientStateStore` (core/store.py), which
knows round t+1's ids ahead and prefetches its rows while the device computes round t.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import struct

from fedjax_lab.core.tree import tree_broadcast, tree_put, tree_take
from fedjax_lab.core.types import Algorithm


@struct.dataclass
class ClientRows:
    server: Any   # server-side state (global model, optimizer state, round counter ...)
    rows: Any     # per-client rows, every leaf stacked [N, ...]


@dataclasses.dataclass(frozen=True, eq=False)
class RowRound:
    """A round over the sampled clients' rows (see the module docstring)."""
    init_server: Callable[[Any, Any], Any]
    init_row: Callable[[Any], Any]
    sample: Callable[[Any, Any], jax.Array]
    step: Callable[[Any, Any, Any, Any], tuple]
    params: Callable[[Any, Any], Any]


@dataclasses.dataclass(frozen=True, eq=False)
class RowAlgorithm(Algorithm):
    """An Algorithm whose per-client rows can also live in a host-side store (`rows_round`)."""
    rows_round: Optional[RowRound] = None


def gather_step_scatter(spec: RowRound, state: ClientRows, data, key):
    """One round with all N rows on device: rows[ids] -> step -> rows.at[ids].set(new rows)."""
    ids = spec.sample(data, key)
    server, new_rows, metrics = spec.step(state.server, tree_take(state.rows, ids), ids, data, key)
    return ClientRows(server=server, rows=tree_put(state.rows, ids, new_rows)), metrics


def init_rows(spec: RowRound, key, data) -> ClientRows:
    """Server state plus the initial row broadcast to all data.num_clients clients."""
    server = spec.init_server(key, data)
    rows = jax.tree.map(jnp.array, tree_broadcast(spec.init_row(server), data.num_clients))
    return ClientRows(server=server, rows=rows)


def row_algorithm(spec: RowRound, *, name: str = "", model, global_params=None,
                  check: Callable = lambda data: None, config: Optional[dict] = None,
                  personalized: bool = True) -> RowAlgorithm:
    """The Algorithm record of a stateful method: state = ClientRows(server, rows [N, ...])."""
    def client_params(state, ids):
        return spec.params(state.server, tree_take(state.rows, ids))

    glob = None if global_params is None else (lambda state: global_params(state.server))
    return RowAlgorithm(name=name, model=model, init=lambda key, data: init_rows(spec, key, data),
                        round=lambda state, data, key: gather_step_scatter(spec, state, data, key),
                        client_params=client_params, global_params=glob, personalized=personalized,
                        check=check, config=dict(config or {}), rows_round=spec)
