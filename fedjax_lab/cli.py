"""`fedjax-lab`: run an algorithm, list what exists, describe a dataset.

    fedjax-lab run fedprox --dataset synthetic --alpha 1 --beta 1 --rounds 200 --seed 0 --out runs/x \
        --mu 1 --stragglers 0.9 --clients-per-round 10 --local-steps 20 --batch-size 10 --client-lr 0.01
    fedjax-lab list
    fedjax-lab data SPEC

Every keyword hyperparameter of an algorithm factory is a flag: the flags are derived from the
factory's signature (name -> --kebab-case, type from the annotation or default), never hand-listed.
"""
from __future__ import annotations

import argparse
import functools
import inspect
import json
import sys
import typing

SCALARS = (bool, int, float, str)
NOT_FLAGS = {"model", "name", "extra_loss"}


def _factory_params(factory):
    """[(name, type, default)] of the factory's keyword hyperparameters (partials included)."""
    func = factory.func if isinstance(factory, functools.partial) else factory
    hints = typing.get_type_hints(func)
    out = []
    for p in inspect.signature(factory).parameters.values():
        if p.kind is not inspect.Parameter.KEYWORD_ONLY or p.name in NOT_FLAGS:
            continue
        typ = hints.get(p.name)
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if typ not in SCALARS and len(args) == 1 and args[0] in SCALARS:
            typ = args[0]                                   # Optional[int] -> int
        if typ not in SCALARS:
            typ = type(p.default) if isinstance(p.default, SCALARS) else None
        if typ is not None:
            out.append((p.name, typ, p.default))
    return out


def _add_factory_flags(parser, factory):
    group = parser.add_argument_group("algorithm hyperparameters (from the factory signature)")
    for name, typ, default in _factory_params(factory):
        flag = "--" + name.replace("_", "-")
        if typ is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=default)
        else:
            group.add_argument(flag, dest=name, type=typ, default=default,
                               help=f"default: {default!r}")


def _run_parser(alg_name, factory):
    p = argparse.ArgumentParser(prog=f"fedjax-lab run {alg_name}", allow_abbrev=False)
    g = p.add_argument_group("run")
    g.add_argument("--dataset", default="synthetic", help="dataset spec, e.g. synthetic:1,1")
    g.add_argument("--alpha", type=float, default=None, help="Synthetic(alpha, beta): alpha")
    g.add_argument("--beta", type=float, default=None, help="Synthetic(alpha, beta): beta")
    g.add_argument("--iid", action="store_true", default=None, help="Synthetic-IID")
    g.add_argument("--num-clients", type=int, default=None, help="number of clients (synthetic)")
    g.add_argument("--model", default=None, help="model name (default: logistic)")
    g.add_argument("--rounds", type=int, default=200)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--eval-every", type=int, default=10)
    g.add_argument("--checkpoint-every", type=int, default=None)
    g.add_argument("--resume", action="store_true")
    g.add_argument("--out", default=None, help="directory for config.json, metrics.jsonl, checkpoints")
    g.add_argument("--no-progress", action="store_true")
    _add_factory_flags(p, factory)
    return p


def _valid_flags(parser):
    return sorted(s for a in parser._actions for s in a.option_strings if s.startswith("--"))


def make_model(name, data):
    from fedjax_lab import models
    if hasattr(models, "get"):
        return models.get(name or "logistic", data.num_classes, data.x[:1])
    if (name or "logistic") not in models.MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {sorted(models.MODELS)}")
    return models.MODELS[name or "logistic"][0](data.num_classes)


def cmd_run(argv):
    from fedjax_lab.algorithms import ALGORITHMS
    if not argv or argv[0].startswith("-"):
        raise SystemExit(f"usage: fedjax-lab run ALGORITHM [flags]; algorithms: {sorted(ALGORITHMS)}")
    alg_name, rest = argv[0], argv[1:]
    if alg_name not in ALGORITHMS:
        raise SystemExit(f"error: unknown algorithm {alg_name!r}; valid algorithms: "
                         f"{', '.join(sorted(ALGORITHMS))}")
    factory = ALGORITHMS[alg_name][0]
    parser = _run_parser(alg_name, factory)
    args, unknown = parser.parse_known_args(rest)
    if unknown:
        raise SystemExit(f"error: unknown flag(s) {' '.join(unknown)} for `fedjax-lab run "
                         f"{alg_name}`; valid flags: {' '.join(_valid_flags(parser))}")
    hparams = {name: getattr(args, name) for name, _, _ in _factory_params(factory)}

    import fedjax_lab
    from fedjax_lab.data import load
    options = dict(alpha=args.alpha, beta=args.beta, iid=args.iid, num_clients=args.num_clients)
    try:
        data = load(args.dataset, seed=args.seed, **options)
        model = make_model(args.model, data)
        alg = factory(model, **hparams)
        result = fedjax_lab.run(
            alg, data, rounds=args.rounds, key=args.seed, eval_every=args.eval_every, out=args.out,
            checkpoint_every=args.checkpoint_every, resume=args.resume,
            progress=not args.no_progress,
            extra_config=dict(dataset=args.dataset, dataset_options={k: v for k, v in options.items()
                                                                     if v is not None},
                              seed=args.seed, command=["fedjax-lab", "run"] + list(argv)))
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        raise SystemExit(f"error: {e}")
    last = result.history[-1] if result.history else {}
    keys = ["round", "train_loss", "test_loss"] + [
        f"test{kind}_accuracy{q}" for kind in ("", "_personal") for q in ("", "_p10", "_p50", "_p90")]
    print(json.dumps({k: last[k] for k in keys if k in last}))
    return 0


def cmd_list(argv):
    from fedjax_lab import models
    from fedjax_lab.algorithms import ALGORITHMS
    from fedjax_lab.data import DATASETS
    print("algorithms:")
    for name, (_, desc) in sorted(ALGORITHMS.items()):
        print(f"  {name:<14} {desc}")
    print("datasets:")
    for name, desc in sorted(DATASETS.items()):
        print(f"  {name:<14} {desc}")
    print("models:")
    for name, entry in sorted(models.MODELS.items()):
        print(f"  {name:<14} {entry[1]}")
    return 0


def cmd_data(argv):
    from fedjax_lab.data import stats
    return stats.main(argv)


COMMANDS = {"run": cmd_run, "list": cmd_list, "data": cmd_data}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print(f"commands: {', '.join(COMMANDS)}")
        return 0
    if argv[0] not in COMMANDS:
        raise SystemExit(f"error: unknown command {argv[0]!r}; valid commands: {', '.join(COMMANDS)}")
    return COMMANDS[argv[0]](argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
