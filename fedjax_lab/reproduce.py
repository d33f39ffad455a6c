"""`fedjax-lab reproduce PAPER [--full] [--seeds N] [--out DIR]` and `fedjax-lab reproduce --list`.

Runs `experiments/reproduce/PAPER.py` at a small CPU size (default) or the paper-like size
(`--full`) and prints the claim it checks, the measured numbers and PASS / FAIL (exit status 0 / 1).
Scripts are discovered, not listed: every `experiments/reproduce/*.py` not starting with `_` is one.
`--list` prints each script's last recorded outcome (from the metrics JSON its last run wrote to
experiments/reproduce/figures/) and its claim, without importing any script.

The protocol every script follows:

    CLAIM = "one sentence: the paper's claim this script checks"

    def main(argv=None) -> dict:       # parses --full, --out DIR, --seeds N (`protocol_parser`)
        ...                            # prints its table, writes its figure and metrics to --out
        return {"claim": CLAIM, "passed": bool, "numbers": {name: float, ...}}

`passed` is computed from the measured numbers against the claim, never written down. At the
default size a script writes `PAPER_small.png` / `PAPER_small.json`, at `--full` `PAPER.png` /
`PAPER.json`, so a quick check never overwrites the figure the README shows.
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import math
import os
import sys

SCRIPTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "experiments", "reproduce")
FIGURES_DIR = os.path.join(SCRIPTS_DIR, "figures")


def protocol_parser(doc: str, *, seeds: int = 1) -> argparse.ArgumentParser:
    """The flags every reproduction script takes; scripts add their own."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--full", action="store_true", help="the paper-like size (default: a small CPU size)")
    p.add_argument("--out", default=FIGURES_DIR, help="directory for the figure and the metrics")
    p.add_argument("--seeds", type=int, default=None,
                   help=f"number of seeds 0 .. N-1 (default {seeds} at the small size)")
    return p


def fill_sizes(args, *, small: dict, full: dict):
    """Give every size flag the user left at None its value at the chosen size (--full or not)."""
    for k, v in (full if args.full else small).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def default_of(factory, name: str):
    """The default of `name` that `fedjax-lab run ALGORITHM` uses: the factory's own keyword
    default, or the flat Setup name's value in the algorithm's default Setup (`client_lr`,
    `server_lr`, `local_steps` ...). The scripts read their algorithm's settings from here, so
    the CLI and the reproduction share one source of the defaults."""
    import inspect
    from fedjax_lab.core.setup import Setup
    param = inspect.signature(factory).parameters.get(name)
    if param is not None and param.kind is inspect.Parameter.KEYWORD_ONLY \
            and param.default is not inspect.Parameter.empty:
        return param.default
    flat = Setup().over(getattr(factory, "defaults", Setup())).describe()
    if name not in flat:
        fname = getattr(factory, "__name__", "the factory")
        raise ValueError(f"default_of: {fname} has no default named {name!r}; valid names: "
                         f"{sorted(set(flat) | set(inspect.signature(factory).parameters))}")
    return flat[name]


def output_paths(out: str, paper: str, full: bool) -> tuple[str, str]:
    """(figure path, metrics path) of `paper` in `out`; `_small` names at the default size."""
    os.makedirs(out, exist_ok=True)
    stem = paper if full else f"{paper}_small"
    return os.path.join(out, f"{stem}.png"), os.path.join(out, f"{stem}.json")


def finish(claim: str, numbers: dict, passed: bool, metrics_path: str | None = None,
           extra: dict | None = None) -> dict:
    """The protocol's return value; writes it (and `extra`) to `metrics_path` as JSON."""
    result = {"claim": claim, "passed": bool(passed),
              "numbers": {k: float(v) for k, v in numbers.items()}}
    if metrics_path is not None:
        with open(metrics_path, "w") as f:
            json.dump(dict(result, **(extra or {})), f, indent=1)
    return result


def discover(directory: str = SCRIPTS_DIR) -> dict:
    """{paper: path} of the reproduction scripts in `directory`."""
    if not os.path.isdir(directory):
        return {}
    return {name[:-3]: os.path.join(directory, name) for name in sorted(os.listdir(directory))
            if name.endswith(".py") and not name.startswith("_")}


def read_claim(path: str) -> str | None:
    """The script's CLAIM string, read without importing it (so `--list` runs nothing)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "CLAIM" for t in node.targets):
            try:
                return ast.literal_eval(node.value)
            except ValueError:
                return None
    return None


def last_result(paper: str, directory: str = FIGURES_DIR) -> str:
    """The last recorded outcome of `paper` in `directory`: "PASS (full)", "FAIL (small)", ... or
    "not run" (read from the PAPER.json / PAPER_small.json a run wrote there)."""
    for stem, size in ((paper, "full"), (f"{paper}_small", "small")):
        path = os.path.join(directory, f"{stem}.json")
        try:
            with open(path) as f:
                passed = json.load(f).get("passed")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(passed, bool):
            return f"{'PASS' if passed else 'FAIL'} ({size})"
    return "not run"


def load(path: str):
    """Import a script as a module (it is not a package member)."""
    name = "fedjax_lab_reproduce_" + os.path.basename(path)[:-3]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def check_result(paper: str, result) -> dict:
    """The protocol's return value, or ValueError saying what is wrong with it."""
    if not isinstance(result, dict) or set(result) < {"claim", "passed", "numbers"}:
        raise ValueError(f"{paper}.main() must return a dict with keys 'claim', 'passed', 'numbers'; "
                         f"got {result!r:.200}")
    if not isinstance(result["passed"], bool):
        raise ValueError(f"{paper}.main(): 'passed' must be a bool, got {result['passed']!r}")
    numbers = result["numbers"]
    if not isinstance(numbers, dict) or not numbers:
        raise ValueError(f"{paper}.main(): 'numbers' must be a non-empty dict of name -> float")
    for k, v in numbers.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise ValueError(f"{paper}.main(): numbers[{k!r}] must be a float, got {v!r}")
    return result


def format_result(paper: str, result: dict) -> str:
    width = max(len(k) for k in result["numbers"])
    lines = [f"{paper}: {result['claim']}", ""]
    for k, v in result["numbers"].items():
        lines.append(f"  {k:<{width}}  {v:.4g}" if math.isfinite(v) else f"  {k:<{width}}  {v}")
    lines += ["", f"{paper}: {'PASS' if result['passed'] else 'FAIL'}"]
    return "\n".join(lines)


def cmd_reproduce(argv=None, *, directory: str | None = None) -> int:
    """`fedjax-lab reproduce PAPER [--full] [script flags]` / `--list`; 0 on PASS, 1 on FAIL."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="fedjax-lab reproduce", add_help=False,
                                description="run a paper's reproduction script and check its claim")
    p.add_argument("paper", nargs="?")
    p.add_argument("--list", action="store_true")
    p.add_argument("--dir", default=directory or SCRIPTS_DIR, help=argparse.SUPPRESS)
    p.add_argument("-h", "--help", action="store_true")
    args, rest = p.parse_known_args(argv)
    scripts = discover(args.dir)
    if args.list or (args.paper is None and not args.help):
        width = max((len(n) for n in scripts), default=0)
        figures = os.path.join(args.dir, "figures")
        for name, path in scripts.items():
            print(f"  {name:<{width}}  {last_result(name, figures):<13}  {read_claim(path) or '(no CLAIM)'}")
        if args.paper is None and not args.list:
            print("usage: fedjax-lab reproduce PAPER [--full] [--seeds N] [--out DIR]")
        return 0
    if args.paper is None:
        p.print_help()
        return 0
    if args.paper not in scripts:
        raise SystemExit(f"error: unknown paper {args.paper!r}; valid papers: "
                         f"{', '.join(scripts) or '(none in ' + args.dir + ')'}")
    module = load(scripts[args.paper])
    if not callable(getattr(module, "main", None)) or not isinstance(getattr(module, "CLAIM", None), str):
        raise SystemExit(f"error: {scripts[args.paper]} does not follow the protocol "
                         "(a CLAIM string and main(argv) -> dict)")
    if args.help:
        rest = rest + ["--help"]
    print(f"{args.paper}: {module.CLAIM}\n", flush=True)
    result = module.main(rest)
    try:
        result = check_result(args.paper, result)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    print("\n" + format_result(args.paper, result))
    return 0 if result["passed"] else 1


def main(argv=None):
    return cmd_reproduce(argv)


if __name__ == "__main__":
    sys.exit(main())
