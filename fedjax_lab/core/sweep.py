"""Sweeps: every (grid point x seed) of an experiment as one more leading axis of the scanned rounds.

    result = fl.sweep(algorithms.fedprox, data, model=model, grid={"mu": [0, 0.01, 0.1, 1]},
                      seeds=[0, 1, 2], rounds=100, eval_every=10, fixed={"client_lr": 0.05},
                      out="runs/mu")                     # one directory per run, as fl.run writes
    result.runs[i].history                              # run i: point result.points[i], seed seeds[i]

Names. A name in `grid` (or in `fixed`, the values every run shares) is either a keyword of the
factory (`mu`, `lam`, `personal_lr`, `global_solver` ...), a flat Setup name of `Setup.of`
(`client_lr`, `server_lr`, `stragglers`, `clients_per_round`, `local_steps`, `aggregator`,
`aggregator_OPTION` ...) or `model` (a list of Models). An unknown name is a ValueError that lists
the valid ones. `setup` is the Setup the flat names are applied over.

One program per shape. Run i of a program is row i of every array: the factory is called inside
`jax.vmap` with traced floats, so R runs are one XLA program of `eval_every` scanned rounds
followed by the driver's evaluation (`evaluation_sums`), vmapped over runs.
  * Traced (one program for all values): seeds, and float-valued names whose values are all
    numbers: client_lr, server_lr, personal_lr, mu, lam, sigma, stragglers, momentum, b1, b2, eps,
    and float aggregator / uplink options.
  * Static (one program per value, run one after another): ints (local_steps, epochs,
    batch_size, clients_per_round), strings and bools (aggregator, client_optimizer, sampling,
    shuffle, drop_stragglers, global_solver), models, and floats the algorithm needs as Python
    numbers: attack_fraction fixes round(fraction * N) attackers; such a float is found by
    tracing the program once (`static=` forces a name static).
`result.programs` lists the static combinations.

Per run the numbers are those of `fl.run(factory(model, **point), data, rounds=..., key=seed,
eval_every=...)`, to float rounding: the same key split (k_init, k_rounds), round r with
fold_in(k_rounds, r), the driver's evaluation code, and per-run metrics.jsonl / config.json in the
same format. A run whose loss turns non-finite stops recording at that evaluation (fl.run raises
FloatingPointError there); its message is in `result.errors` and the other runs go on.

Memory. `runs_per_chunk=k` runs k runs at a time (the last chunk is padded with copies of its
last run, so every chunk is the same program); `memory_budget=bytes` picks k from XLA's memory
analysis of a one-run probe compile. The numbers do not depend on k (rows are independent).

Draws. The runs of one seed share their round keys, so they sample the same clients, batches and
stragglers: under `rounds.keys_repeat(len(seeds))` the vmapped `participate` draws once per
different key and gives each run the draws of its key (bit-identical; every round checks that
the keys repeat as expected and draws for all runs when they do not). Not when a swept name
changes the draws (stragglers): then every run draws. (Logistic FedProx, 4 mu x 3 seeds, programs
alone: 0.53 -> 0.45 ms per run and round on one device; experiments/PERF.md.)

Devices. `devices` (default: every local device of the default backend) spreads each chunk's
runs evenly over the devices: `jax.shard_map` over a one-axis mesh named 'runs', each device
running its share of the runs as the one-device program does (no communication: the runs are
independent; the data is replicated). A chunk of k runs on D devices is padded to a multiple of D
with copies of its last run; a one-run chunk stays on one device. `memory_budget` is per device.
The numbers are those of one device. On a CPU, jax has one device unless told otherwise before it
starts (`jax.config.update('jax_num_cpu_devices', n)`, or `fedjax-lab sweep`, which gives it one
device per core): a second CPU device is how a sweep uses a second core, since XLA:CPU runs the
small ops of one program on one core (logistic FedProx, 12 runs, 2 cores: 0.28 against 0.50 ms per
run and round; experiments/PERF.md).

Resume. With `out=`, each chunk's stacked state is checkpointed (orbax) every `checkpoint_every`
rounds and at its end; `resume=True` skips finished chunks and continues an interrupted one from
its last checkpoint, so a killed sweep writes the metrics an uninterrupted one would. A checkpoint
holds the chunk's own runs, not its padding, so a sweep resumes on another number of devices.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import inspect
import itertools
import json
import os
import shutil
import typing
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from fedjax_lab.core import checkpoint as ckpt
from fedjax_lab.core import validate
from fedjax_lab.core.driver import (RunResult, _accountant, _as_key, _read_history, data_fingerprint,
                                    eval_record)
from fedjax_lab.core.evaluate import evaluation_sums
from fedjax_lab.core.rounds import keys_repeat
from fedjax_lab.core.setup import ALL_FIELDS, Setup, setup_flags
from fedjax_lab.core.types import Model
from fedjax_lab.core.values import scalar_type

NOT_NAMES = {"setup"}
PREFIXED = ("aggregator_", "uplink_")
_TRACE_ERRORS = (jax.errors.ConcretizationTypeError, jax.errors.TracerBoolConversionError,
                 jax.errors.TracerIntegerConversionError, jax.errors.TracerArrayConversionError)


# ---------------------------------------------------------------------------------------------
# Names: factory keywords, flat Setup names, model


def valid_names(factory) -> dict:
    """{name: (kind, type)} of what a grid may name: kind "factory" (its keyword
    hyperparameters), "setup" (flat Setup.of names of the fields it uses) or "model"."""
    func = factory.func if isinstance(factory, functools.partial) else factory
    try:
        hints = typing.get_type_hints(func)
    except Exception:                       # an annotation that does not resolve: no types
        hints = {}
    out = {"model": ("model", Model)}
    for p in inspect.signature(factory).parameters.values():
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in NOT_NAMES:
            default = None if p.default is inspect.Parameter.empty else p.default
            out[p.name] = ("factory", scalar_type(hints.get(p.name), default))
    uses = getattr(factory, "uses", ALL_FIELDS)
    for flag, (typ, _) in setup_flags(uses).items():
        out.setdefault(flag, ("setup", typ))
    if "uplink" in uses:
        out.setdefault("uplink", ("setup", str))
    return out


def check_names(factory, names, *, what: str = "grid") -> dict:
    """{name: (kind, type)} of `names`; ValueError naming an unknown name and listing valid ones."""
    valid = valid_names(factory)
    uses = getattr(factory, "uses", ALL_FIELDS)
    allowed = tuple(p for p, f in zip(PREFIXED, ("aggregator", "uplink")) if f in uses)
    out = {}
    for name in names:
        if name in valid:
            out[name] = valid[name]
        elif allowed and name.startswith(allowed):
            out[name] = ("setup", None)
        else:
            extra = " and " + ", ".join(p + "OPTION" for p in allowed) if allowed else ""
            fname = getattr(getattr(factory, "func", factory), "__name__", "the factory")
            raise ValueError(f"{what}: unknown name {name!r} for {fname}; valid names: "
                             f"{', '.join(sorted(valid))}{extra}")
    return out


def _with_flat(setup: Setup, flat: dict) -> Setup:
    """`setup` with flat Setup.of names applied over it (later names win)."""
    if not flat:
        return setup
    Setup.of(**{k: v for k, v in flat.items() if not hasattr(v, "shape")})   # name check only
    merged = {**dict(setup.overrides), **flat}
    return dataclasses.replace(setup, overrides=tuple(sorted(merged.items())))


@dataclasses.dataclass(frozen=True)
class Program:
    """The algorithm of one static combination, built from its (possibly traced) float values.

    Hashable by its fields, so the jitted programs below compile once per (Program, shapes)."""
    factory: Any
    model: Any
    static: tuple              # ((name, value), ...) every run of the program shares
    traced: tuple              # names whose values are a leading [runs] array
    kinds: tuple               # ((name, kind), ...) of every name in static and traced
    setup: Setup = Setup()
    runs_as_map: bool = False  # runs as a lax.map, not a vmap (sweep_rounds; set by `sweep`)
    seeds: int = 0             # different seeds among the runs, whose draws are shared (0: unknown)

    def build(self, values: dict):
        kinds = dict(self.kinds)
        point = {**dict(self.static), **values}
        own = {k: v for k, v in point.items() if kinds[k] == "factory"}
        flat = {k: v for k, v in point.items() if kinds[k] == "setup"}
        model = point.get("model", self.model)
        return self.factory(model, setup=_with_flat(self.setup, flat), **own)


# ---------------------------------------------------------------------------------------------
# The vmapped programs: init, and `length` rounds + evaluation, for a chunk of runs


@functools.partial(jax.jit, static_argnames=("program",))
def sweep_init(program: Program, values, data, k_init):
    """[runs] stacked initial states."""
    return jax.vmap(lambda v, k: program.build(v).init(k, data))(values, k_init)


RUNS_PER_BLOCK_CPU = 16


@functools.partial(jax.jit, static_argnames=("program", "length"), donate_argnames=("state",))
def sweep_rounds(program: Program, values, state, data, adapt_data, k_rounds, first_round,
                 length: int):
    """Rounds first_round + 1 ... first_round + length of every run, then the driver's evaluation
    sums; per-round metrics [runs, length], sums [runs, clients].

    The runs are a vmap (one batched op per layer for all runs x clients), except for programs
    whose local training runs its clients as a lax.map (core/local.py: large models on CPU, the
    client axis on one device, where XLA:CPU's batched matmuls and convolutions run far below its
    plain ones): vmapping runs there would batch every client's ops over the runs inside that map
    (the MLP sweep 0.86x, the CNN's 0.29x as fast per run as sequential fl.run's), so the runs are a
    lax.map too (`program.runs_as_map`): each client step unbatched, as in fl.run. On CPU the
    vmap takes at most RUNS_PER_BLOCK_CPU runs at a time (a lax.map over vmapped blocks): past
    that, the stacked arrays outgrow the caches and every op slows down per run (logistic FedProx,
    48 runs, ms per run and 10 rounds: one vmap 30.5; blocks of 4, 8, 12, 16, 24: 20.2, 13.8,
    12.7, 10.7, 12.4; experiments/PERF.md)."""
    def one(v, state, key):
        alg = program.build(v)
        body = lambda s, r: alg.round(s, data, jax.random.fold_in(key, r))
        state, per_round = jax.lax.scan(body, state, first_round + 1 + jnp.arange(length))
        return state, per_round, evaluation_sums(alg, state, data, adapt_data)
    runs = k_rounds.shape[0]
    with keys_repeat(program.seeds):         # the runs of one seed draw their cohorts once
        if runs == 1:                        # fl.run's program, no batching, no loop
            out = one(*jax.tree.map(lambda a: a[0], (values, state, k_rounds)))
            return jax.tree.map(lambda a: a[None], out)
        if program.runs_as_map:
            return jax.lax.map(lambda a: one(*a), (values, state, k_rounds))
        if jax.default_backend() == "cpu" and runs > RUNS_PER_BLOCK_CPU:
            return jax.lax.map(lambda a: one(*a), (values, state, k_rounds),
                               batch_size=RUNS_PER_BLOCK_CPU)
        return jax.vmap(one)(values, state, k_rounds)


RUNS = "runs"


def runs_mesh(devices) -> jax.sharding.Mesh:
    """A one-axis mesh named 'runs' over `devices` (module docstring, Devices)."""
    return jax.make_mesh((len(devices),), (RUNS,), axis_types=(AxisType.Auto,),
                         devices=list(devices))


@functools.partial(jax.jit, static_argnames=("program", "mesh", "length"),
                   donate_argnames=("state",))
def sharded_rounds(program: Program, mesh, values, state, data, adapt_data, k_rounds, first_round,
                   length: int):
    """`sweep_rounds` with the runs split evenly over `mesh`'s 'runs' axis: each device runs the
    one-device program on its own runs (no communication); data and evaluation data replicated."""
    def local(values, state, k_rounds, data, adapt_data, first_round):
        return sweep_rounds(program, values, state, data, adapt_data, k_rounds, first_round, length)
    return jax.shard_map(local, mesh=mesh, in_specs=(P(RUNS),) * 3 + (P(),) * 3,
                         out_specs=P(RUNS), check_vma=False,   # no collective to check
                         )(values, state, k_rounds, data, adapt_data, first_round)


def devices_of(devices) -> list:
    """The devices a sweep spreads its runs over: None (every local device of the default
    backend), a count n (the first n of them) or a non-empty list of jax devices."""
    local = jax.local_devices()
    if devices is None:
        return local
    if isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
        if not 1 <= devices <= len(local):
            raise ValueError(f"devices must be between 1 and {len(local)} (the local devices), "
                             f"got {devices}")
        return local[:int(devices)]
    if not isinstance(devices, (list, tuple)) or not devices \
            or not all(isinstance(d, jax.Device) for d in devices):
        raise ValueError("devices must be None, a count of local devices or a non-empty list of "
                         f"jax devices, got {devices!r}")
    return list(devices)


_CLIENTS_MAPPED: dict = {}


def clients_mapped(program: Program, values: dict, data) -> bool:
    """Whether one run of `program` (its float `values` as Python numbers) trains its clients as a
    lax.map (core/local.py's "auto" rule, or clients="map"): one abstract trace of a round,
    counted by local.clients_as_map, cached per (program, data shapes)."""
    from fedjax_lab.core import local
    shapes = tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(data) if hasattr(x, "shape"))
    cache_key = (program, jax.tree.structure(data), shapes)
    if cache_key not in _CLIENTS_MAPPED:
        before = getattr(local.clients_as_map, "traced", 0)
        alg = program.build(values)
        key = jax.random.key(0)
        state = jax.eval_shape(lambda k: alg.init(k, data), key)
        jax.eval_shape(lambda st, k: alg.round(st, data, k), state, key)
        _CLIENTS_MAPPED[cache_key] = getattr(local.clients_as_map, "traced", 0) > before
    return _CLIENTS_MAPPED[cache_key]


# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SweepResult:
    """points[i], seeds[i] and runs[i] (a RunResult: final state, history) of run i; `names` the
    grid names; `programs` the static combinations (one compiled program each); `errors`
    {run index: message} of runs stopped by a non-finite loss; `run_names` their directories."""
    names: list
    points: list
    seeds: list
    runs: list
    run_names: list
    programs: list
    runs_per_chunk: int
    errors: dict = dataclasses.field(default_factory=dict)

    def summary(self, metrics=None):
        """(per-run rows, per-point rows): final_M and best_M per run (best: max for accuracies,
        min for losses); mean and std over seeds of each per point."""
        return summarize(self, metrics)


def _number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _label(v) -> str:
    if isinstance(v, Model):
        return v.name
    if callable(v):
        return getattr(v, "__name__", repr(v))
    return str(v)


def run_name(names, point, seed) -> str:
    parts = [f"{n}={_label(point[n])}" for n in names] + [f"seed={seed}"]
    return ",".join(p.replace(os.sep, "_").replace(" ", "") for p in parts)


def sweep(factory, data, *, grid: dict, seeds=(0,), rounds: int, eval_every: int = 10,
          model: Optional[Model] = None, fixed: Optional[dict] = None, setup: Setup = Setup(),
          static=(), runs_per_chunk: Optional[int] = None, memory_budget: Optional[float] = None,
          out: Optional[str] = None, checkpoint_every: Optional[int] = None, resume: bool = False,
          progress: bool = True, extra_config=None, devices=None) -> SweepResult:
    """Run `factory` on `data` for every point of the product of `grid` and every seed (module
    docstring). grid: {name: [values]} (product over names, in order); seeds: ints; fixed:
    {name: value} shared by all runs; model: the Model (unless `model` is a grid name; None: the
    algorithm's default model, `setup.default_model(factory)`); static:
    names to keep static even if float; extra_config: a dict, or a callable(point, seed) -> dict,
    recorded in every run's config.json (as fl.run's extra_config); devices: what the runs are
    spread over (None: every local device; a count; a list of jax devices; module docstring)."""
    validate.positive("rounds", rounds, integer=True)
    validate.positive("eval_every", eval_every, integer=True)
    if not isinstance(grid, dict):
        raise ValueError(f"grid must be a dict {{name: [values]}}, got {type(grid).__name__}")
    fixed = dict(fixed or {})
    kinds = check_names(factory, list(grid) + list(fixed), what="grid")
    for name in static:
        check_names(factory, [name], what="static")
    for name, vals in grid.items():
        if isinstance(vals, (str, bytes)) or not hasattr(vals, "__iter__") or len(list(vals)) == 0:
            raise ValueError(f"grid[{name!r}] must be a non-empty list of values, got {vals!r}")
        labels = [_label(v) for v in vals]
        if len(set(labels)) != len(labels):
            raise ValueError(f"grid[{name!r}] repeats a value ({labels}); expected distinct values")
    both = sorted(set(grid) & set(fixed))
    if both:
        raise ValueError(f"fixed: {both} also in grid; a name is either swept or fixed")
    seeds = list(seeds)
    if not seeds or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool)
                            for s in seeds):
        raise ValueError(f"seeds must be a non-empty list of ints, got {seeds!r}")
    if model is None and "model" not in grid and fixed.get("model") is None:
        from fedjax_lab import models        # the algorithm's own default (setup.defaults(model=))
        from fedjax_lab.core.setup import default_model
        model = models.get(default_model(factory), data.num_classes, data.x[:1])
    if runs_per_chunk is not None:
        validate.positive("runs_per_chunk", runs_per_chunk, integer=True)
    if memory_budget is not None:
        validate.positive("memory_budget", memory_budget)
    if checkpoint_every is not None:
        validate.positive("checkpoint_every", checkpoint_every, integer=True)
        if checkpoint_every % eval_every:
            raise ValueError(f"checkpoint_every={checkpoint_every} must be a multiple of "
                             f"eval_every={eval_every}")
    if (resume or checkpoint_every) and out is None:
        raise ValueError("resume / checkpoint_every need out= (the sweep's directory)")
    devs = devices_of(devices)

    names = list(grid)
    points = [dict(zip(names, combo)) for combo in itertools.product(*(list(grid[n]) for n in names))]
    typ = lambda n: kinds[n][1]
    floats = [n for n in names if n not in static and kinds[n][0] != "model"
              and all(_number(v) for v in grid[n])
              and (typ(n) is float or (typ(n) is None and all(isinstance(v, float) for v in grid[n])))]
    if fixed.get("model") is not None:
        model = fixed.pop("model")
    base = dict(factory=factory, model=model, kinds=tuple(sorted((k, v[0]) for k, v in kinds.items())),
                setup=setup, seeds=len(set(seeds)))
    runs = [(p, s) for p in points for s in seeds]          # grid order: points x seeds
    # every run's algorithm with plain Python values: the factory's checks, before any tracing
    concrete = [Program(static=_items({**fixed, **p}), traced=(), **base).build({})
                for p in points]
    for alg in concrete:
        alg.check(data)
    traced = _traceable(base, floats, points[0], fixed, data)
    groups: dict = {}                                        # programs by their static values
    for i, (p, s) in enumerate(runs):
        key = tuple((n, p[n]) for n in names if n not in traced)
        groups.setdefault(key, []).append(i)
    per_run = [concrete[i // len(seeds)] for i in range(len(runs))]

    results: list = [None] * len(runs)
    errors: dict = {}
    rnames = [run_name(names, p, s) for p, s in runs]
    if out is not None:
        os.makedirs(out, exist_ok=True)
    bar = _progress(len(runs) * rounds, progress)
    programs, chosen = [], None
    for gi, (static_key, members) in enumerate(groups.items()):
        program = Program(static=_items({**fixed, **dict(static_key)}), traced=tuple(traced), **base)
        point = runs[members[0]][0]
        if clients_mapped(program, {n: float(point[n]) for n in traced}, data):
            program = dataclasses.replace(program, runs_as_map=True)
        programs.append(dict(static_key))
        k = runs_per_chunk
        if k is None and memory_budget is not None:
            k = len(devs) * _chunk_from_budget(program, per_run[members[0]], data, len(members),
                                               memory_budget, eval_every, rounds,
                                               runs[members[0]][0], traced)
        k = min(k or len(members), len(members))
        chosen = k if chosen is None else min(chosen, k)
        shards = min(len(devs), k)             # a chunk of k runs on `shards` devices
        mesh = runs_mesh(devs[:shards]) if shards > 1 else None
        for ci in range(0, len(members), k):
            idx = members[ci:ci + k]
            _run_chunk(program, [per_run[i] for i in idx], idx, -(-k // shards) * shards, runs,
                       rnames, traced, data, rounds, eval_every, out, checkpoint_every, resume,
                       extra_config, results, errors, bar, tag=f"chunk_{gi}_{ci // k}", mesh=mesh)
    bar.close()
    return SweepResult(names=names, points=[p for p, _ in runs], seeds=[s for _, s in runs],
                       runs=results, run_names=rnames, programs=programs, runs_per_chunk=chosen,
                       errors=errors)


def _items(d: dict) -> tuple:
    return tuple(sorted(d.items(), key=lambda kv: kv[0]))


def _traceable(base, floats, point, fixed, data) -> list:
    """The float names that the algorithm accepts traced: all of them unless tracing one program
    raises a concretization error; then each on its own."""
    if not floats:
        return []

    def ok(names):
        program = Program(static=_items({**fixed, **{n: point[n] for n in point
                                                     if n not in names}}), traced=tuple(names),
                          **base)
        values = {n: jnp.asarray([float(point[n])], jnp.float32) for n in names}
        try:
            _, k = jax.random.split(jax.random.key(0))
            alg = program.build({n: float(point[n]) for n in names})
            adapt = alg.adapt_split(data) if getattr(alg, "adapt", None) is not None else None
            state = jax.eval_shape(lambda v, kk: sweep_init(program, v, data, kk), values, k[None])
            jax.eval_shape(lambda v, st, kk: sweep_rounds(program, v, st, data, adapt, kk,
                                                          jnp.int32(0), 1), values, state, k[None])
            return True
        except _TRACE_ERRORS:
            return False
    if ok(floats):
        return list(floats)
    return [n for n in floats if ok([n])]


def _chunk_from_budget(program, alg, data, n_runs, budget, eval_every, rounds, point, traced):
    """Runs per chunk under `budget` bytes, from XLA's memory analysis of a one-run program."""
    values = {n: jnp.asarray([float(point[n])], jnp.float32) for n in traced}
    k_init, k_rounds = jax.random.split(jax.random.key(0))
    adapt = alg.adapt_split(data) if getattr(alg, "adapt", None) is not None else None
    state = jax.eval_shape(lambda v, k: sweep_init(program, v, data, k), values, k_init[None])
    length = min(eval_every, rounds)
    stats = sweep_rounds.lower(program, values, state, data, adapt, k_rounds[None], jnp.int32(0),
                               length).compile().memory_analysis()
    shared = sum(x.nbytes for x in jax.tree.leaves((data, adapt)) if hasattr(x, "nbytes"))
    total = stats.temp_size_in_bytes + stats.argument_size_in_bytes + stats.output_size_in_bytes
    per_run = max(total - shared, 1)
    return int(max(1, min(n_runs, (budget - shared) // per_run)))


def _run_chunk(program, algs, idx, width, runs, rnames, traced, data, rounds, eval_every, out,
               checkpoint_every, resume, extra_config, results, errors, bar, *, tag, mesh=None):
    """Runs `idx` (padded to `width` with copies of the last) as one vmapped program, split over
    `mesh`'s 'runs' axis when there is one."""
    pad = idx + [idx[-1]] * (width - len(idx))
    values = {n: jnp.asarray([float(runs[i][0][n]) for i in pad], jnp.float32) for n in traced}
    keys = [jax.random.split(_as_key(int(runs[i][1]))[0]) for i in pad]
    k_init = jnp.stack([k[0] for k in keys])
    k_rounds = jnp.stack([k[1] for k in keys])
    fp = data_fingerprint(data)
    configs = []
    for alg, i in zip(algs, idx):
        extra = extra_config(runs[i][0], runs[i][1]) if callable(extra_config) else (extra_config or {})
        configs.append(dict(alg.config, rounds=rounds, eval_every=eval_every,
                            key=_as_key(int(runs[i][1]))[1], data=fp, **extra))
    adapt = algs[0].adapt_split(data) if getattr(algs[0], "adapt", None) is not None else None
    accountants = [_accountant(alg, data, None) for alg in algs]   # the driver's default
    split = lambda tree: tree            # the runs' rows over the devices, the rest replicated
    one_device = None
    if mesh is not None:
        split = lambda tree: jax.device_put(tree, NamedSharding(mesh, P(RUNS)))
        values, k_init, k_rounds = split((values, k_init, k_rounds))
        data, adapt = jax.device_put((data, adapt), NamedSharding(mesh, P()))
        one_device = mesh.devices.flat[0]
    state = split(sweep_init(program, values, data, k_init))
    histories = [[] for _ in idx]
    start = 0
    mgr = None
    if out is not None:
        cdir = os.path.join(out, "_sweep", tag)
        if not resume and os.path.isdir(cdir):
            shutil.rmtree(cdir)
        mgr = ckpt.manager(cdir)
        step = ckpt.latest_step(mgr) if resume else None
        if step is not None:
            meta = ckpt.read_meta(mgr, step)    # checked before the state's shapes are
            if meta["runs"] != [rnames[i] for i in idx]:
                raise ValueError(f"cannot resume {out}: chunk {tag} holds runs {meta['runs']}, "
                                 f"this sweep puts {[rnames[i] for i in idx]} there (the same "
                                 "runs_per_chunk / memory_budget as the first call resumes it)")
            own, _ = ckpt.restore(mgr, step, _own_rows(state, len(idx), one_device))
            state = split(_padded_rows(own, width))
            for name, saved, now in zip(meta["runs"], meta["configs"], configs):
                diff = ckpt.config_diff(saved, now)
                if diff:
                    raise ValueError(f"cannot resume run {name}: the checkpoint was written by a "
                                     "different config:\n  " + "\n  ".join(diff))
            start = int(step)
            for j, i in enumerate(idx):
                histories[j] = _read_history(os.path.join(out, rnames[i]), upto=start)
            for j, i in enumerate(idx):
                if meta.get("errors", {}).get(rnames[i]):
                    errors[i] = meta["errors"][rnames[i]]
        for j, i in enumerate(idx):
            rdir = os.path.join(out, rnames[i])
            os.makedirs(rdir, exist_ok=True)
            with open(os.path.join(rdir, "config.json"), "w") as f:
                json.dump(configs[j], f, indent=2, sort_keys=True)
            with open(os.path.join(rdir, "metrics.jsonl"), "w") as f:
                for r in histories[j]:
                    f.write(json.dumps(r, sort_keys=True) + "\n")
    bar.update(start * len(idx))
    totals = [{k: v for k, v in (h[-1] if h else {}).items() if k.startswith("total_")}
              for h in histories]
    t = start
    while t < rounds:
        length = min(eval_every, rounds - t)
        if mesh is None:
            state, per_round, sums = sweep_rounds(program, values, state, data, adapt, k_rounds,
                                                  jnp.int32(t), length)
        else:
            state, per_round, sums = sharded_rounds(program, mesh, values, state, data, adapt,
                                                    k_rounds, jnp.int32(t), length)
        per_round, sums = jax.device_get((per_round, sums))
        for j, i in enumerate(idx):
            if i in errors:
                continue
            row = lambda tree: jax.tree.map(lambda x: x[j], tree)
            record, err = run_record(t, length, row(per_round), row(sums), totals[j])
            if err:
                errors[i] = err
                continue
            if accountants[j] is not None:        # privacy accounting, as fl.run adds it
                record.update({k: float(v) for k, v in accountants[j](t + length).items()})
            histories[j].append(record)
            if out is not None:
                with open(os.path.join(out, rnames[i], "metrics.jsonl"), "a") as f:
                    f.write(json.dumps(record, sort_keys=True) + "\n")
        t += length
        if mgr is not None and ((checkpoint_every and t % checkpoint_every == 0) or t == rounds):
            ckpt.save(mgr, t, _own_rows(state, len(idx), one_device),
                      {"runs": [rnames[i] for i in idx], "configs": configs,
                                      "round": t,
                                      "errors": {rnames[i]: errors[i] for i in idx if i in errors}})
        bar.update(length * len(idx))
    if mesh is not None:                     # results on one device, as fl.run's
        state = jax.device_put(state, one_device)
    for j, i in enumerate(idx):
        results[i] = RunResult(state=_take(state, j), history=histories[j])


def _own_rows(state, n, device):
    """The first n rows (the chunk's own runs, not its padding) of a chunk's state, on `device`
    (None: where they are): what a checkpoint holds, so that it does not depend on the padding,
    which depends on the number of devices."""
    return _rows(state if device is None else jax.device_put(state, device), n)


@functools.partial(jax.jit, static_argnames=("n",))
def _rows(tree, n):
    return jax.tree.map(lambda x: x[:n], tree)


@functools.partial(jax.jit, static_argnames=("width",))
def _padded_rows(tree, width):
    """Rows padded to `width` with copies of the last (a padded run is a copy of the last run, so
    its state is the last run's state)."""
    return jax.tree.map(lambda x: jnp.concatenate([x] + [x[-1:]] * (width - x.shape[0])), tree)


@jax.jit
def _take(tree, j):
    return jax.tree.map(lambda x: x[j], tree)


def run_record(t, length, per_round: dict, sums: dict, totals: dict):
    """(record, error) of one run's evaluation after round t + length, as fl.run writes it (the
    driver's rules: per-round metrics averaged, bytes_* summed into running total_* entries)."""
    first = t
    t += length
    for name in sorted(per_round):
        if name.endswith(("_loss", "_objective")):
            bad = np.flatnonzero(~np.isfinite(np.asarray(per_round[name])))
            if bad.size:
                return None, (f"non-finite training loss ({name}) at round {first + int(bad[0]) + 1}")
    record = eval_record(t, per_round, sums, totals)
    for name in ("train_loss", "test_loss", "train_personal_loss", "test_personal_loss"):
        if name in record and not np.isfinite(record[name]):
            return None, f"non-finite {name} ({record[name]}) at round {t}"
    return record, None


def _progress(total, enabled):
    from tqdm.auto import tqdm
    return tqdm(total=total, disable=not enabled, unit="round", leave=False)


# ---------------------------------------------------------------------------------------------
# Summaries, summary.csv and the figure

DEFAULT_METRICS = ("train_loss", "test_loss", "test_accuracy", "test_personal_accuracy",
                   "test_adapted_accuracy")


def summarize(result: SweepResult, metrics=None):
    """(per-run rows, per-point rows); see SweepResult.summary."""
    metrics = list(metrics or [m for m in DEFAULT_METRICS
                               if any(r is not None and r.history and m in r.history[-1]
                                      for r in result.runs)])
    best = lambda m, xs: (max if "accuracy" in m else min)(xs)
    run_rows = []
    for i, r in enumerate(result.runs):
        row = {"run": result.run_names[i], **{n: _label(result.points[i][n]) for n in result.names},
               "seed": result.seeds[i], "rounds": r.history[-1]["round"] if r.history else 0,
               "error": result.errors.get(i, "")}
        for m in metrics:
            xs = [h[m] for h in r.history if m in h]
            row[f"final_{m}"] = xs[-1] if xs else float("nan")
            row[f"best_{m}"] = best(m, xs) if xs else float("nan")
        run_rows.append(row)
    point_rows, seen = [], {}
    for row, p in zip(run_rows, result.points):
        seen.setdefault(tuple(row[n] for n in result.names), []).append(row)
    for key, rows in seen.items():
        prow = dict(zip(result.names, key), seeds=len(rows))
        for m in metrics:
            for which in ("final", "best"):
                xs = np.array([r[f"{which}_{m}"] for r in rows], np.float64)
                prow[f"{which}_{m}_mean"] = float(np.mean(xs))
                prow[f"{which}_{m}_std"] = float(np.std(xs))
        point_rows.append(prow)
    return run_rows, point_rows


def write_summary(result: SweepResult, out: str, metrics=None) -> str:
    """summary.csv: one row per run (kind "run": final_M, best_M) then one per point (kind
    "point": final_M_mean, final_M_std, best_M_mean, best_M_std over seeds)."""
    run_rows, point_rows = summarize(result, metrics)
    cols = ["kind"] + list(run_rows[0]) + [c for c in point_rows[0] if c not in run_rows[0]]
    path = os.path.join(out, "summary.csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, restval="")
        w.writeheader()
        for r in run_rows:
            w.writerow({"kind": "run", **r})
        for r in point_rows:
            w.writerow({"kind": "point", **r})
    return path


def plot(result: SweepResult, path: str, metric: str = "test_accuracy") -> str:
    """Learning curves (mean over seeds per point, band = std) and the final `metric` per point."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("the sweep figure needs matplotlib: pip install 'fedjax-lab[plot]' "
                          "(or pip install matplotlib)") from e
    ok = [r for r in result.runs if r is not None and r.history and metric in r.history[-1]]
    if not ok:
        metric = "train_loss"
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 3.8))
    by_point: dict = {}
    for i, r in enumerate(result.runs):
        lab = ", ".join(f"{n}={_label(result.points[i][n])}" for n in result.names) or "runs"
        by_point.setdefault(lab, []).append(r)
    finals_m, finals_s, labels = [], [], []
    for lab, rs in by_point.items():
        rs = [r for r in rs if r.history]
        if not rs:
            continue
        n = min(len(r.history) for r in rs)
        x = [h["round"] for h in rs[0].history[:n]]
        ys = np.array([[h.get(metric, np.nan) for h in r.history[:n]] for r in rs])
        mean, std = np.nanmean(ys, 0), np.nanstd(ys, 0)
        ax0.plot(x, mean, label=lab)
        ax0.fill_between(x, mean - std, mean + std, alpha=0.2)
        finals_m.append(mean[-1]), finals_s.append(std[-1]), labels.append(lab)
    ax0.set_xlabel("round"), ax0.set_ylabel(metric), ax0.legend(fontsize=7)
    ax1.errorbar(range(len(labels)), finals_m, yerr=finals_s, fmt="o-", capsize=3)
    ax1.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
    ax1.set_ylabel(f"final {metric} (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
