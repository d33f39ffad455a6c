"""`fedjax-lab`: run an algorithm, list what exists, describe a dataset.

    fedjax-lab run fedprox --dataset synthetic:alpha=1,beta=1 --rounds 200 --seed 0 --out runs/x \
        --mu 1 --stragglers 0.9 --clients-per-round 10 --local-steps 20 --batch-size 10 --client-lr 0.01
    fedjax-lab run fedavg --aggregator trimmed_mean --aggregator-beta 0.2 --attack sign_flip \
        --attack-fraction 0.2
    fedjax-lab run fedavg --uplink top_k --uplink-k 100 # compress what clients send
    fedjax-lab run --config runs/x/config.json          # re-run a run exactly (flags override it)
    fedjax-lab sweep fedprox --grid mu=0,0.01,0.1,1 --seeds 0,1,2 --rounds 100 --out runs/mu
    fedjax-lab list
    fedjax-lab data SPEC

No flag is hand-listed. An algorithm's flags are (1) its factory's own keyword hyperparameters
(`--mu`, `--lam`, `--alpha` ...) and (2) the fields of the shared values in its `Setup`
(core/setup.py: Cohort, LocalWork, the client_/server_ Optimizer, the attack), with the algorithm's
defaults, plus the options of the chosen aggregator's factory as `--aggregator-OPTION`. Dataset
options live in the dataset spec (`--dataset synthetic:alpha=1,beta=1`), so an algorithm may call
a hyperparameter alpha.
"""
from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import sys
import typing

RUN_FLAGS = {"dataset", "model", "rounds", "seed", "data_seed", "eval_every", "checkpoint_every",
             "resume", "out", "no_progress", "config"}
NOT_FLAGS = {"model", "setup", "name"}
# What a run's own config.json holds beyond flags: checked (algorithm) or recomputed (the rest).
CONFIG_ONLY = {"algorithm", "key", "data", "command", "dataset_options", "derived"}
# Flags of earlier releases, and what they are now.
RENAMED = {
    "--trim-beta": "--aggregator trimmed_mean --aggregator-beta B",
    "--krum-f": "--aggregator krum --aggregator-f F",
    "--krum-m": "--aggregator multi_krum --aggregator-m M",
    "--clip-norm": "--aggregator norm_clip --aggregator-clip-norm C",
    "--gm-iters": "--aggregator geometric_median --aggregator-iters N",
    "--alpha": "--dataset synthetic:alpha=A,beta=B",
    "--beta": "--dataset synthetic:alpha=A,beta=B",
    "--iid": "--dataset synthetic_iid (or synthetic:iid=true)",
    "--num-clients": "--dataset synthetic:clients=N",
    "--lr-decay": "--server-lr-schedule",
    "--lr": "--server-lr",
    "--momentum": "--server-momentum",
    "--mu": "--global-solver fedprox:mu=M (Ditto)",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def own_params(factory):
    """[(name, type, default)] of the factory's own keyword hyperparameters (partials included)."""
    from fedjax_lab.core.values import scalar_type
    func = factory.func if isinstance(factory, functools.partial) else factory
    hints = typing.get_type_hints(func)
    out = []
    for p in inspect.signature(factory).parameters.values():
        if p.kind is not inspect.Parameter.KEYWORD_ONLY or p.name in NOT_FLAGS:
            continue
        typ = scalar_type(hints.get(p.name), p.default)
        if typ is not None:
            out.append((p.name, typ, p.default))
    return out


def _options(factory, prefix):
    """[(prefix_option, type, default)] of a value factory's keyword options."""
    from fedjax_lab.core.values import scalar_type
    hints = typing.get_type_hints(factory)
    return [(f"{prefix}_{p.name}", scalar_type(hints.get(p.name), p.default),
             None if p.default is inspect.Parameter.empty else p.default)
            for p in inspect.signature(factory).parameters.values() if not p.name.startswith("_")]


def setup_params(factory, aggregator=None, uplink=None):
    """[(name, type, default)] of the shared values' flags, with the algorithm's defaults."""
    from fedjax_lab import aggregators
    from fedjax_lab import uplink as uplinks
    from fedjax_lab.core.setup import ALL_FIELDS, Setup, setup_flags
    uses = getattr(factory, "uses", ALL_FIELDS)
    resolved = Setup().over(getattr(factory, "defaults", Setup()))
    current = resolved.describe()
    out = [(name, typ, current.get(name, default))
           for name, (typ, default) in setup_flags(uses).items()]
    if "aggregator" in uses:
        agg = aggregator or resolved.aggregator.name
        mine = dict(resolved.aggregator.options) if agg == resolved.aggregator.name else {}
        for opt, typ, default in aggregators.options(agg):
            out.append((f"aggregator_{opt}", typ, mine.get(opt, default)))
    if "uplink" in uses:         # one transform from the command line; chains from Python
        up = uplink or resolved.uplink.name
        out.append(("uplink", str, resolved.uplink.name))
        if up in uplinks.UPLINKS:
            mine = dict(resolved.uplink.options) if up == resolved.uplink.name else {}
            out += [(n, t, mine.get(n[len("uplink_"):], d))
                    for n, t, d in _options(uplinks.UPLINKS[up], "uplink")]
    return out


class Flags(typing.NamedTuple):
    """An algorithm's flags, computed once per command: [(name, type, default)] of its own
    hyperparameters and of the shared values (with its defaults)."""
    own: list
    shared: list


def flags_of(alg_name, factory, aggregator=None, uplink=None) -> Flags:
    """The algorithm's Flags; its own hyperparameter may not shadow a run flag or a shared
    value's flag."""
    flags = Flags(own_params(factory), setup_params(factory, aggregator, uplink))
    clash = sorted({n for n, _, _ in flags.own} & (RUN_FLAGS | {n for n, _, _ in flags.shared}))
    if clash:
        raise ValueError(f"algorithm {alg_name!r}: keyword(s) {clash} collide with the run's or "
                         "the Setup's flags; rename them or pass them through the Setup")
    return flags


def _add(group, name, typ, default):
    if typ is bool:
        group.add_argument(_flag(name), dest=name, action=argparse.BooleanOptionalAction,
                           default=default)
    else:
        group.add_argument(_flag(name), dest=name, type=typ, default=default,
                           help=f"default: {default!r}")


def run_parser(alg_name, factory, aggregator=None, uplink=None,
               flags: typing.Optional[Flags] = None):
    flags = flags or flags_of(alg_name, factory, aggregator, uplink)
    p = argparse.ArgumentParser(prog=f"fedjax-lab run {alg_name}", allow_abbrev=False)
    g = p.add_argument_group("run")
    g.add_argument("--dataset", default="synthetic",
                   help="dataset spec with its options, e.g. synthetic:alpha=1,beta=1,clients=30")
    from fedjax_lab.core.setup import default_model
    g.add_argument("--model", default=None,
                   help=f"model name (default: {default_model(factory)!r}, {alg_name}'s own)")
    g.add_argument("--rounds", type=int, default=200)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--data-seed", type=int, default=None,
                   help="seed of the dataset's partition (default: --seed)")
    g.add_argument("--eval-every", type=int, default=10)
    g.add_argument("--checkpoint-every", type=int, default=None)
    g.add_argument("--resume", action="store_true")
    g.add_argument("--out", default=None, help="directory for config.json, metrics.jsonl, checkpoints")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--config", default=None,
                   help="JSON or TOML file with the same keys as the flags (a run's config.json "
                        "re-runs it); flags given here override it")
    own = p.add_argument_group(f"{alg_name} hyperparameters (from the factory signature)")
    for name, typ, default in flags.own:
        _add(own, name, typ, default)
    shared = p.add_argument_group("shared values (core/setup.py), with this algorithm's defaults")
    for name, typ, default in flags.shared:
        _add(shared, name, typ, default)
    return p


def _valid_flags(parser):
    return sorted(s for a in parser._actions for s in a.option_strings if s.startswith("--"))


def read_config(path):
    if not os.path.exists(path):
        raise SystemExit(f"error: --config {path}: no such file")
    try:
        if path.endswith(".toml"):
            import tomllib
            with open(path, "rb") as f:
                cfg = tomllib.load(f)
        else:
            with open(path) as f:
                cfg = json.load(f)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: --config {path}: could not read it as "
                         f"{'TOML' if path.endswith('.toml') else 'JSON'} ({e})")
    if not isinstance(cfg, dict):
        raise SystemExit(f"error: --config {path}: expected a table of flag names, got "
                         f"{type(cfg).__name__}")
    return {k.replace("-", "_"): v for k, v in cfg.items()}


def make_model(name, data, factory=None):
    """The model `name`, or, when None, the algorithm's own default (`setup.defaults(model=...)`:
    FedGKT's pair, a body/head model for pFedHN-PC and FedGen; "logistic" otherwise)."""
    from fedjax_lab import models
    from fedjax_lab.core.setup import default_model
    return models.get(name or default_model(factory), data.num_classes, data.x[:1])


def _explain_unknown(unknown, parser, alg_name):
    hints = [f"{u} is now {RENAMED[u.split('=')[0]]}" for u in unknown if u.split("=")[0] in RENAMED]
    msg = f"error: unknown flag(s) {' '.join(unknown)} for `fedjax-lab run {alg_name}`"
    if hints:
        msg += "; " + "; ".join(hints)
    return msg + f"; valid flags: {' '.join(_valid_flags(parser))}"


def _parse(argv, command="run", add=None):
    """(factory, parser, args, hparams, flat) of `fedjax-lab COMMAND ALGORITHM [flags]`: the algorithm's
    parser (run_parser, plus `add(parser)`'s flags), --config defaults, unknown flags refused."""
    from fedjax_lab.algorithms import ALGORITHMS
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    pre.add_argument("--aggregator", default=None)
    pre.add_argument("--uplink", default=None)
    known, _ = pre.parse_known_args(argv)
    cfg = read_config(known.config) if known.config else {}
    if argv and not argv[0].startswith("-"):
        alg_name, rest = argv[0], argv[1:]
    elif "algorithm" in cfg:
        alg_name, rest = cfg["algorithm"], argv
    else:
        raise SystemExit(f"usage: fedjax-lab {command} ALGORITHM [flags]; algorithms: "
                         f"{sorted(ALGORITHMS)}")
    if alg_name not in ALGORITHMS:
        raise SystemExit(f"error: unknown algorithm {alg_name!r}; valid algorithms: "
                         f"{', '.join(sorted(ALGORITHMS))}")
    if cfg.get("algorithm", alg_name) != alg_name:
        raise SystemExit(f"error: --config {known.config} is a config of {cfg['algorithm']!r}, "
                         f"not of {alg_name!r}")
    factory = ALGORITHMS[alg_name][0]
    try:
        flags = flags_of(alg_name, factory, known.aggregator or cfg.get("aggregator"),
                         known.uplink or cfg.get("uplink"))
        parser = run_parser(alg_name, factory, flags=flags)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if add is not None:
        parser.prog = f"fedjax-lab {command} {alg_name}"
        add(parser)
    dests = {a.dest for a in parser._actions}
    bad = sorted(k for k in cfg if k not in dests and k not in CONFIG_ONLY)
    if bad:
        raise SystemExit(f"error: --config {known.config}: unknown key(s) {bad}; valid keys: "
                         f"{sorted(dests - {'help', 'config'})}")
    parser.set_defaults(**{k: v for k, v in cfg.items() if k in dests})
    args, unknown = parser.parse_known_args(rest)
    if unknown:
        raise SystemExit(_explain_unknown(unknown, parser, alg_name).replace(
            "fedjax-lab run", f"fedjax-lab {command}"))
    hparams = {name: getattr(args, name) for name, _, _ in flags.own}
    # Only what the user changed (a flag, or a --config key) goes into the Setup: the rest are the
    # algorithm's own defaults, which may depend on its hyperparameters (signSGD's vote).
    flat = {name: getattr(args, name) for name, _, default in flags.shared
            if getattr(args, name) != default}
    return factory, parser, args, hparams, flat


def build_run(factory, args, hparams, flat):
    """(algorithm, data) of a parsed `fedjax-lab run` (what `_parse` returns): what it trains."""
    from fedjax_lab.core.setup import Setup
    from fedjax_lab.data import load
    data = load(args.dataset, seed=args.seed if args.data_seed is None else args.data_seed)
    model = make_model(args.model, data, factory)
    return factory(model, setup=Setup.of(**flat), **hparams), data


def cmd_run(argv):
    factory, _, args, hparams, flat = _parse(argv, "run")

    import fedjax_lab
    from fedjax_lab.core.setup import default_model
    model_name = args.model or default_model(factory)
    try:
        alg, data = build_run(factory, args, hparams, flat)
        extra = {} if args.data_seed is None else {"data_seed": args.data_seed}
        result = fedjax_lab.run(
            alg, data, rounds=args.rounds, key=args.seed, eval_every=args.eval_every, out=args.out,
            checkpoint_every=args.checkpoint_every, resume=args.resume,
            progress=not args.no_progress,
            extra_config=dict(dataset=args.dataset, model=model_name, seed=args.seed,
                              command=["fedjax-lab", "run"] + list(argv), **extra))
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        raise SystemExit(f"error: {e}")
    last = result.history[-1] if result.history else {}
    keys = ["round", "train_loss", "test_loss"] + [
        f"test{kind}_accuracy{q}" for kind in ("", "_personal", "_adapted")
        for q in ("", "_p10", "_p50", "_p90")]
    print(json.dumps({k: last[k] for k in keys if k in last}))
    return 0


def _sweep_flags(parser):
    g = parser.add_argument_group("sweep")
    g.add_argument("--grid", action="append", default=[], metavar="NAME=V1,V2,...",
                   help="a swept name (a hyperparameter or shared-value flag, or model) and its "
                        "values; repeat for a product grid")
    g.add_argument("--seeds", default="0", help="comma-separated training seeds (default 0); the "
                   "dataset is drawn once, with --data-seed (default 0)")
    g.add_argument("--runs-per-chunk", type=int, default=None,
                   help="runs per compiled chunk (default: all runs of a program at once)")
    g.add_argument("--memory-budget", default=None,
                   help="pick runs per chunk from a memory budget, e.g. 2GB or 500MB")
    g.add_argument("--cpu-devices", type=int, default=None,
                   help="jax CPU devices to spread the runs over (default: one per core)")


def _cpu_devices(argv):
    """jax's CPU device count for a sweep: --cpu-devices N, default one per core. The sweep
    spreads its runs over the devices, and on a CPU a device per core is how it uses more than
    one core. It must be set before jax's backends start; when they have (`main` called from a
    running Python program) the devices stay as they are."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--cpu-devices", type=int, default=None)
    n = pre.parse_known_args(argv)[0].cpu_devices
    if n is not None and n < 1:
        raise SystemExit(f"error: --cpu-devices must be >= 1, got {n}")
    if n is None and "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return                                 # the user's XLA flag decides
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    import jax
    try:
        jax.config.update("jax_num_cpu_devices", n or cores or 1)
    except RuntimeError:                       # jax has started in this process
        if n is not None:
            print("note: --cpu-devices has no effect: jax has started in this process",
                  file=sys.stderr)


def _bytes(text):
    units = {"kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "b": 1}
    t = text.strip().lower()
    for u, f in units.items():
        if t.endswith(u):
            try:
                return float(t[:-len(u)]) * f
            except ValueError:
                break
    try:
        return float(t)
    except ValueError:
        raise SystemExit(f"error: --memory-budget {text!r}: expected bytes such as 2GB, 500MB "
                         "or 1e9")


def _grid_values(parser, name, text, make):
    """The typed values of one --grid NAME=V1,V2 (typed as the flag NAME is)."""
    actions = {a.dest: a for a in parser._actions}
    out = []
    for v in (x.strip() for x in text.split(",")):
        if not v:
            continue
        if name == "model":
            out.append(make(v))
        elif name in actions and isinstance(actions[name], argparse.BooleanOptionalAction):
            if v.lower() not in ("true", "false", "1", "0"):
                raise SystemExit(f"error: --grid {name}: {v!r} is not a bool (true/false)")
            out.append(v.lower() in ("true", "1"))
        elif name in actions and actions[name].type is not None:
            try:
                out.append(actions[name].type(v))
            except ValueError:
                raise SystemExit(f"error: --grid {name}: {v!r} is not a "
                                 f"{actions[name].type.__name__}")
        else:
            out.append(_literal_value(v))
    if not out:
        raise SystemExit(f"error: --grid {name}= has no values; expected {name}=V1,V2,...")
    return out


def _literal_value(v):
    import ast
    try:
        return ast.literal_eval(v)
    except (ValueError, SyntaxError):
        return v


def cmd_sweep(argv):
    """`fedjax-lab sweep ALGORITHM --grid NAME=V1,V2 [--grid ...] --seeds 0,1,2 [run flags] --out
    DIR`: one run per (point, seed) as fl.sweep runs them; DIR/RUN/{config.json, metrics.jsonl}
    in the `run` format, DIR/summary.csv, DIR/sweep.png; --resume continues a killed sweep."""
    _cpu_devices(argv)
    factory, parser, args, hparams, flat = _parse(argv, "sweep", add=_sweep_flags)
    if not args.out:
        raise SystemExit("error: fedjax-lab sweep needs --out DIR (one directory per run)")
    if not args.grid:
        raise SystemExit("error: fedjax-lab sweep needs at least one --grid NAME=V1,V2,...")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"error: --seeds {args.seeds!r}: expected comma-separated ints, e.g. 0,1,2")
    import fedjax_lab
    from fedjax_lab.core import sweep as sw
    from fedjax_lab.core.setup import default_model
    from fedjax_lab.data import load
    data_seed = 0 if args.data_seed is None else args.data_seed
    try:
        data = load(args.dataset, seed=data_seed)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    grid = {}
    for item in args.grid:
        name, eq, values = item.partition("=")
        name = name.strip().replace("-", "_")
        if not eq or not name:
            raise SystemExit(f"error: --grid {item!r}: expected NAME=V1,V2,...")
        if name in grid:
            raise SystemExit(f"error: --grid {name} given twice")
        grid[name] = _grid_values(parser, name, values, lambda m: make_model(m, data, factory))
    fixed = {**{k: v for k, v in hparams.items() if k not in grid},
             **{k: v for k, v in flat.items() if k not in grid}}
    model = None if "model" in grid else make_model(args.model, data, factory)
    names = list(grid)

    def extra(point, seed):
        return dict(dataset=args.dataset, seed=seed, data_seed=data_seed,
                    model=point["model"].name if "model" in point
                    else (args.model or default_model(factory)),
                    command=["fedjax-lab", "sweep"] + list(argv))
    try:
        result = fedjax_lab.sweep(
            factory, data, grid=grid, seeds=seeds, rounds=args.rounds, eval_every=args.eval_every,
            model=model, fixed=fixed, runs_per_chunk=args.runs_per_chunk,
            memory_budget=None if args.memory_budget is None else _bytes(args.memory_budget),
            out=args.out, checkpoint_every=args.checkpoint_every, resume=args.resume,
            progress=not args.no_progress, extra_config=extra)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    sw.write_summary(result, args.out)
    try:
        sw.plot(result, os.path.join(args.out, "sweep.png"))
    except ImportError as e:
        print(f"note: no figure: {e}", file=sys.stderr)
    _, points = result.summary()
    metric = next((m for m in ("test_accuracy", "test_personal_accuracy", "train_loss")
                   if f"final_{m}_mean" in points[0]), None)
    print(f"{len(result.runs)} runs, {len(result.programs)} compiled program(s), "
          f"{result.runs_per_chunk} runs per chunk; {args.out}/summary.csv")
    for p in points:
        label = ", ".join(f"{n}={p[n]}" for n in names)
        if metric:
            print(f"  {label}: final {metric} {p[f'final_{metric}_mean']:.4f} ± "
                  f"{p[f'final_{metric}_std']:.4f} ({p['seeds']} seeds)")
    for i, msg in sorted(result.errors.items()):
        print(f"  stopped: {result.run_names[i]}: {msg}", file=sys.stderr)
    return 0


def cmd_list(argv):
    from fedjax_lab import aggregators, attacks, models
    from fedjax_lab.algorithms import ALGORITHMS
    from fedjax_lab.core.optimizers import OPTIMIZERS
    from fedjax_lab.data import DATASETS
    sections = [("algorithms", {n: d for n, (_, d) in ALGORITHMS.items()}),
                ("datasets", DATASETS),
                ("models", {n: e[1] for n, e in models.MODELS.items()}),
                ("aggregators (--aggregator)", {n: d for n, (_, d) in aggregators.AGGREGATORS.items()}),
                ("attacks (--attack)", attacks.ATTACKS),
                ("optimizers (--client-optimizer, --server-optimizer)", OPTIMIZERS)]
    for title, entries in sections:
        print(f"{title}:")
        for name, desc in sorted(entries.items()):
            print(f"  {name:<16} {desc}")
    return 0


def cmd_data(argv):
    from fedjax_lab.data import stats
    return stats.main(argv)


def cmd_plot(argv):
    from fedjax_lab.plot import cmd_plot as plot
    return plot(argv)


def cmd_reproduce(argv):
    from fedjax_lab.reproduce import cmd_reproduce as reproduce
    return reproduce(argv)


def cmd_leaderboard(argv):
    """`fedjax-lab leaderboard`: every personalization method with its defaults (leaderboard.py)."""
    from fedjax_lab import leaderboard as lb
    p = argparse.ArgumentParser(prog="fedjax-lab leaderboard", description=lb.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="digits,mnist1d", help="comma-separated dataset names")
    p.add_argument("--splits", default="shards=2;dirichlet=0.1",
                   help="semicolon-separated partitions (dataset spec options)")
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--clients-per-round", type=int, default=10)
    p.add_argument("--finetune-steps", type=int, default=20)
    p.add_argument("--methods", default=None, help="comma-separated names (default: every "
                   "personalization method registered); the baselines always run")
    p.add_argument("--out", default="runs/leaderboard")
    a = p.parse_args(argv)
    entries = lb.leaderboard(
        datasets=a.datasets.split(","), splits=a.splits.split(";"), clients=a.clients,
        seeds=[int(s) for s in a.seeds.split(",")], rounds=a.rounds,
        clients_per_round=a.clients_per_round, finetune_steps=a.finetune_steps,
        methods=None if a.methods is None else a.methods.split(","), out=a.out)
    print(lb.table(entries))
    print(f"wrote {a.out}/leaderboard.md, leaderboard.json, leaderboard.png")


COMMANDS = {"run": cmd_run, "sweep": cmd_sweep, "list": cmd_list, "data": cmd_data, "plot": cmd_plot,
            "reproduce": cmd_reproduce, "leaderboard": cmd_leaderboard}


def load_plugins(argv):
    """Import the algorithm files named by `--plugin FILE` (anywhere in argv, repeatable) and by
    $FEDJAX_LAB_PLUGINS (paths joined by os.pathsep), which call `fedjax_lab.register`, and the
    installed packages' `fedjax_lab.algorithms` entry points; returns argv without --plugin."""
    import importlib.util
    from fedjax_lab.registry import load_entry_points
    rest, files = [], [f for f in os.environ.get("FEDJAX_LAB_PLUGINS", "").split(os.pathsep) if f]
    it = iter(argv)
    for a in it:
        if a == "--plugin" or a.startswith("--plugin="):
            path = a.partition("=")[2] if "=" in a else next(it, None)
            if not path:
                raise SystemExit("error: --plugin needs a file: --plugin path/to/my_algorithm.py")
            files.append(path)
        else:
            rest.append(a)
    for i, path in enumerate(files):
        if not os.path.isfile(path):
            raise SystemExit(f"error: --plugin {path!r}: no such file (expected a Python file "
                             "that calls fedjax_lab.register(name, factory))")
        spec = importlib.util.spec_from_file_location(f"fedjax_lab_plugin_{i}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    load_entry_points()
    return rest


def main(argv=None):
    argv = load_plugins(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print(f"commands: {', '.join(COMMANDS)}")
        return 0
    if argv[0] not in COMMANDS:
        raise SystemExit(f"error: unknown command {argv[0]!r}; valid commands: {', '.join(COMMANDS)}")
    return COMMANDS[argv[0]](argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
