"""Model heterogeneity, written once: clients in architecture groups, one jitted round for all.

    arch = hetero.architectures((cnn_widths(10, channels=(10, 18), hidden=50),
                                 cnn_widths(10, channels=(10, 20), hidden=50),
                                 cnn_widths(10, channels=(10, 22), hidden=50)), group_of="blocks")
    rows = hetero.init_rows(arch, key, data)                 # tuple: group g's params [N_g, ...]
    rows, out = hetero.map_groups(arch, client_fn, rows, ids, per_client, distinct=True)

Client i belongs to group g = group_of[i] and runs models[g]; its parameters are row slot_of[i]
of group g's stack (every leaf [N_g, ...]). `group_of` is a [N] array given by the user or the
rule "blocks" (contiguous, near-equal blocks in client order: FedProto's official code gives
clients 0-6, 7-13 and 14-19 its three MNIST CNN widths). The assignment is static (a numpy array
fixed by data.num_clients), so group sizes and slots are shapes, not traced values.

One round, all groups, one XLA program (`map_groups`). The sampled cohort `ids` [C] may hold any
mix of groups. For every group (a Python loop over the few groups at trace time, never over
clients) the cohort positions of its members are compacted into K_g = min(C, N_g) slots
(`jnp.nonzero(..., size=K_g)`; K_g = C when a client may be drawn twice), their rows gathered,
the group's client function vmapped over the slots (unused slots masked out) and the rows
scattered back. The group's work sits under a `lax.cond` on "any member sampled", so a group with
no client in this round's cohort runs nothing but the test. Each group's client function is
traced once, so the program compiles once per set of architectures and shapes, not per round
or group (tests/test_hetero.py counts the traces and the jit cache entries).

Layout choice, sequential groups vs one padded vmap: groups of different widths could be padded
to the widest model and run as one vmap (zero-padded ReLU units stay exactly zero and get zero
gradient), but then every client pays the widest model's FLOPs and the padding rule depends on the
model's layers. We run the groups one after another in the same program (not padded; no padded
layout is offered). `experiments/reproduce/fedproto.py --layouts` times a FedProto-mh round (three
groups, conv2 widths 18 / 20 / 22) against one group of the widest CNN for every client (what a
padded single vmap would cost at least): 56 ms for the three groups vs 76 ms for one group of the
widest (and 68 ms for one homogeneous group of the middle width), idle 2-core CPU, README.

Evaluation (`group_sums`): each client with its own architecture on its rows of a split,
per-client (loss_sum, correct_sum, count) [N], vmapped within each group.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab.core.tree import tree_take
from fedjax_lab.core.types import Algorithm, Model

GROUP_RULES = ("blocks",)


@dataclasses.dataclass(frozen=True, eq=False)
class HeteroAlgorithm(Algorithm):
    """An Algorithm whose clients may differ in architecture: its state's rows are a tuple of
    per-group stacks, so the driver's stacked-params evaluation cannot score it (it has
    global_params=None, personalized=False); `evaluate_sums(state, data)` returns the per-client
    sums {name: (loss_sum, correct_sum, count)} (jittable), e.g. from `group_sums`."""
    architectures: Optional["Architectures"] = None
    evaluate_sums: Optional[Callable] = None


@dataclasses.dataclass(frozen=True, eq=False)
class Architectures:
    """Client models in groups: `models[g]` is group g's Model; `group_of` a [N] int array or a
    rule name ("blocks"). Compared by identity (a static argument of jitted code)."""
    models: tuple
    group_of: Union[str, tuple]

    @property
    def num_groups(self) -> int:
        return len(self.models)

    def group_ids(self, num_clients: int) -> np.ndarray:
        """[num_clients] group of every client (ValueError if the given array does not fit)."""
        if isinstance(self.group_of, str):
            return (np.arange(num_clients) * self.num_groups // max(num_clients, 1)).astype(np.int32)
        g = np.asarray(self.group_of, np.int32)
        if g.shape[0] != num_clients:
            raise ValueError(f"group_of must give one group id per client: it has {g.shape[0]} "
                             f"entries, the data has {num_clients} clients")
        return g

    def members(self, num_clients: int) -> tuple:
        """(ids of group 0, ids of group 1, ...) as static numpy arrays."""
        g = self.group_ids(num_clients)
        return tuple(np.flatnonzero(g == k).astype(np.int32) for k in range(self.num_groups))

    def slot_of(self, num_clients: int) -> np.ndarray:
        """[num_clients] row of every client inside its group's stack."""
        out = np.zeros(num_clients, np.int32)
        for m in self.members(num_clients):
            out[m] = np.arange(m.shape[0])
        return out

    def check(self, data):
        """ValueError unless the assignment fits `data` and no group is empty."""
        empty = [k for k, m in enumerate(self.members(data.num_clients)) if m.size == 0]
        if empty:
            raise ValueError(f"group_of: group(s) {empty} of the {self.num_groups} models have no "
                             f"client among the {data.num_clients}; give every model a client")


def architectures(models: Union[Model, Sequence[Model]], group_of: Union[str, Sequence[int],
                  np.ndarray] = "blocks") -> Architectures:
    """Validated Architectures (module docstring); a single Model is one group of every client."""
    if isinstance(models, Architectures):
        return models
    models = (models,) if isinstance(models, Model) else tuple(models)
    if not models or any(not isinstance(m, Model) for m in models):
        raise ValueError(f"models must be a Model or a non-empty sequence of Models, got "
                         f"{[type(m).__name__ for m in models]}")
    if isinstance(group_of, str):
        if group_of not in GROUP_RULES:
            raise ValueError(f"group_of must be one of {list(GROUP_RULES)} or a [num_clients] array "
                             f"of group ids, got {group_of!r}")
        return Architectures(models, group_of)
    g = np.asarray(group_of)
    if g.ndim != 1 or g.size == 0 or not np.issubdtype(g.dtype, np.integer):
        raise ValueError(f"group_of must be a non-empty 1-D integer array of group ids, got shape "
                         f"{g.shape} dtype {g.dtype}")
    if g.min() < 0 or g.max() >= len(models):
        bad = int(np.flatnonzero((g < 0) | (g >= len(models)))[0])
        raise ValueError(f"group_of must lie in [0, {len(models)}) (one id per model), got "
                         f"group_of[{bad}] = {int(g[bad])}")
    return Architectures(models, tuple(int(v) for v in g))


def require_split(arch: Architectures, who: str):
    """ValueError unless every model exposes features / head (representation-level methods)."""
    for k, m in enumerate(arch.models):
        if m.features is None or m.head is None:
            raise ValueError(f"model: {who} needs models with a features / head split (apply = "
                             f"head o features); model {k} ({m.name!r}) has none")


def feature_dims(arch: Architectures, sample_x) -> tuple:
    """Per group, the shape of one example's representation features(params, x)[0]."""
    out = []
    for m in arch.models:
        p = jax.eval_shape(m.init, jax.random.key(0), sample_x)
        out.append(tuple(jax.eval_shape(lambda p_, x: m.features(p_, x), p, sample_x).shape[1:]))
    return tuple(out)


def init_rows(arch: Architectures, key, data, init: Callable = None) -> tuple:
    """Group g's stacked initial params [N_g, ...]: client i's own model
    models[g].init(fold_in(key, i), data.x[:1]) (or `init(g, key_i)`), vmapped within the group."""
    sample = data.x[:1]
    rows = []
    for g, (m, ids) in enumerate(zip(arch.models, arch.members(data.num_clients))):
        one = (lambda k, m=m: m.init(k, sample)) if init is None else (lambda k, g=g: init(g, k))
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(ids))
        rows.append(jax.vmap(one)(keys))
    return tuple(rows)


def map_groups(arch: Architectures, client_fn: Callable, rows: tuple, ids, per_client, *,
               num_clients: int, distinct: bool = True, out_shape=None):
    """Run the cohort `ids` [C], every group vmapped in the same program (module docstring).

    client_fn(g, row, args) -> (new_row, out): client work of a member of group g (row: its params
    or any per-client pytree of that group; args: its slice of `per_client`, a pytree of [C, ...]
    arrays in cohort order). `out` must have the same structure and shapes in every group.
    distinct: `ids` holds no client twice (capacity min(C, N_g) per group; else C).
    out_shape: one client's `out` as a pytree of jax.ShapeDtypeStruct (None: found by
    jax.eval_shape, which traces client_fn once more per group).
    Returns (rows with the members' new rows scattered back, out stacked [C, ...] in cohort order;
    zeros at positions of no group, which cannot happen for ids in range).
    """
    C = ids.shape[0]
    group_of = jnp.asarray(arch.group_ids(num_clients))
    slot_of = jnp.asarray(arch.slot_of(num_clients))
    members = arch.members(num_clients)
    one_args = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), per_client)
    if out_shape is None:
        shapes = [jax.eval_shape(lambda r, a, g=g: client_fn(g, r, a)[1],
                                 jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype),
                                              rows[g]), one_args)
                  for g in range(arch.num_groups)]
        dims = [jax.tree.map(lambda s: (s.shape, s.dtype), sh) for sh in shapes]
        for g, d in enumerate(dims):
            if d != dims[0]:
                raise ValueError(f"models: group {g}'s clients return outputs of shapes {d}, group "
                                 f"0's {dims[0]}; every architecture must send messages of the "
                                 f"same shapes")
        out_shape = shapes[0]
    outs = jax.tree.map(lambda s: jnp.zeros((C,) + tuple(s.shape), s.dtype), out_shape)
    new_rows = []
    for g in range(arch.num_groups):
        n_g = members[g].shape[0]
        K = min(C, n_g) if distinct else C
        in_g = group_of[ids] == g
        pos = jnp.nonzero(in_g, size=K, fill_value=C)[0]     # cohort positions of the members
        valid = pos < C
        pos_c = jnp.minimum(pos, C - 1)
        slot = slot_of[ids[pos_c]]

        def run(rows_g, outs, g=g, slot=slot, pos=pos, pos_c=pos_c, valid=valid, n_g=n_g):
            fn = lambda row, args: client_fn(g, row, args)
            new, out = jax.vmap(fn)(tree_take(rows_g, slot), tree_take(per_client, pos_c))
            at_row = jnp.where(valid, slot, n_g)            # out of range: dropped
            at_out = jnp.where(valid, pos, C)
            rows_g = jax.tree.map(lambda r, v: r.at[at_row].set(v.astype(r.dtype), mode="drop"),
                                  rows_g, new)
            outs = jax.tree.map(lambda o, v: o.at[at_out].set(v.astype(o.dtype), mode="drop"),
                                outs, out)
            return rows_g, outs

        # a group with no member in this cohort runs only the predicate
        rows_g, outs = jax.lax.cond(jnp.any(in_g), run, lambda r, o: (r, o), rows[g], outs)
        new_rows.append(rows_g)
    return tuple(new_rows), outs


def group_sums(arch: Architectures, rows: tuple, split, predict: Callable, *, num_clients: int,
               extra=None):
    """Per-client (loss_sum, correct_sum, count) [N] on `split`, client i evaluated with its own
    architecture and row: predict(g, row, x [W, ...], y [W], extra_i) -> (loss [W], correct [W])
    for the client's rows padded to W = split.max_client_size (masked here). `extra`: an optional
    pytree of [N, ...] per-client values (e.g. the classes a client holds)."""
    width = max(split.max_client_size, 1)
    last = max(split.num_examples - 1, 0)
    loss_sum = jnp.zeros(num_clients, jnp.float32)
    correct_sum = jnp.zeros(num_clients, jnp.float32)
    for g, ids in enumerate(arch.members(num_clients)):
        ids = jnp.asarray(ids)

        def one(row, lo, size, ex, g=g):
            r = jnp.minimum(lo + jnp.arange(width), last)
            m = (jnp.arange(width) < size).astype(jnp.float32)
            loss, correct = predict(g, row, split.x[r], split.y[r], ex)
            return jnp.sum(loss * m), jnp.sum(correct.astype(jnp.float32) * m)

        lo = split.offsets[ids]
        size = split.offsets[ids + 1] - lo
        ex = None if extra is None else tree_take(extra, ids)
        l, c = jax.vmap(one)(rows[g], lo, size, ex)
        loss_sum = loss_sum.at[ids].set(l)
        correct_sum = correct_sum.at[ids].set(c)
    return loss_sum, correct_sum, split.client_sizes.astype(jnp.float32)


def client_accuracy(correct_sum, count) -> dict:
    """Host-side: per-client accuracy (each client's own correct / count, clients with test data
    only) and its mean and std over clients (the paper's Table 1 form, "mean +- std")."""
    correct_sum, count = np.asarray(correct_sum, np.float64), np.asarray(count, np.float64)
    has = count > 0
    acc = correct_sum[has] / count[has]
    return dict(per_client=acc, mean=float(acc.mean()) if acc.size else float("nan"),
                std=float(acc.std()) if acc.size else float("nan"))
