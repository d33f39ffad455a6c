"""`fedjax-lab plot RUN_DIR ... [--x round|bytes_up] [--y test_accuracy ...] --out FIG.png|.svg`

Each RUN_DIR is one curve:
  * a run directory (`fedjax-lab run --out DIR` / `fl.run(out=DIR)`: config.json + metrics.jsonl),
    drawn as is;
  * a directory holding several run directories (seeds of one configuration, or a `fl.sweep`
    directory over a grid): its runs are grouped by configuration (config.json without the seed
    keys `key`, `seed`, `command`, `data`, `out`), one curve per group, the mean over the group's
    seeds with a +- one standard deviation band, labelled by the values that tell groups apart.

`--x`: `round` (default), `bytes_up` / `bytes_down` (the running totals `total_bytes_up` / ...), or any
metric in metrics.jsonl. `--y`: one panel per metric (default `test_accuracy`).

`--hist`: per-client accuracy histograms instead of curves, one panel per `--y` metric (default
`test_accuracy`, and `test_personal_accuracy` where the run has it), the clients of a sweep's runs
pooled. They are read from `clients.json` in each run directory, which `write_client_metrics(out, alg,
state, data)` writes (per-client accuracy and example count of every evaluation the driver reports:
test, test_personal, test_adapted, train, ...) from the final state.

    from fedjax_lab import plot
    plot.write_client_metrics("runs/ditto", alg, result.state, data)   # after fl.run(..., out=)
    fedjax-lab plot runs/fedavg runs/ditto --hist --out hist.png
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

SEED_KEYS = frozenset({"key", "seed", "command", "data", "out"})
X_ALIASES = {"bytes_up": "total_bytes_up", "bytes_down": "total_bytes_down"}
CLIENTS_FILE = "clients.json"


# -- reading runs -------------------------------------------------------------------------------

def is_run_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "metrics.jsonl"))


def read_history(run_dir: str) -> list:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_config(run_dir: str) -> dict:
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def run_dirs_of(path: str) -> list:
    """[path] for a run directory, its run subdirectories (sorted) for a sweep directory."""
    if not os.path.isdir(path):
        raise ValueError(f"run directory {path!r} does not exist")
    if is_run_dir(path):
        return [path]
    runs = sorted(os.path.join(path, d) for d in os.listdir(path) if is_run_dir(os.path.join(path, d)))
    if not runs:
        raise ValueError(f"{path!r} is neither a run directory (no metrics.jsonl) nor a sweep "
                         "directory (no subdirectory holding a metrics.jsonl)")
    return runs


def configurations(path: str) -> list:
    """[(differing, runs)]: RUN_DIR's runs grouped by configuration (config.json without the seed
    keys), in order of first appearance; `differing` holds the values that tell the groups apart
    (empty for a single group): a `fl.sweep` directory over a grid gives one group per grid point."""
    runs = run_dirs_of(path)
    strip = lambda cfg: {k: v for k, v in cfg.items() if k not in SEED_KEYS}
    groups: dict = {}
    configs = {}
    for run in runs:
        cfg = strip(read_config(run))
        key = json.dumps(cfg, sort_keys=True, default=str)
        groups.setdefault(key, []).append(run)
        configs[key] = cfg
    keys = sorted({k for cfg in configs.values() for k in cfg})
    varying = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True, default=str)
                                       for c in configs.values()}) > 1]
    return [({k: configs[key].get(k) for k in varying}, members) for key, members in groups.items()]


def curve(path_or_runs, x: str, y: str):
    """(x [E], mean [E], std [E] or None, number of runs) of metric `y` against `x` over runs of one
    configuration: a run directory, a directory of seeds of one configuration, or a list of run
    directories. A directory holding several configurations is a ValueError (`plot_curves` draws
    one curve per configuration)."""
    if isinstance(path_or_runs, str):
        groups = configurations(path_or_runs)
        if len(groups) > 1:
            raise ValueError(f"{path_or_runs!r} holds {len(groups)} configurations (they differ in "
                             f"{sorted(groups[0][0])}), not seeds of one; plot_curves draws one "
                             "curve per configuration")
        runs = groups[0][1]
    else:
        runs = list(path_or_runs)
    x = X_ALIASES.get(x, x)
    xs, ys = [], []
    for run in runs:
        hist = read_history(run)
        for key in (x, y):
            missing = [h.get("round") for h in hist if key not in h]
            if missing or not hist:
                have = sorted(hist[0]) if hist else []
                raise ValueError(f"{run}: metric {key!r} is not in metrics.jsonl"
                                 f"{' at rounds ' + str(missing[:5]) if hist else ' (empty)'}; "
                                 f"metrics there: {have}")
        xs.append([h[x] for h in hist])
        ys.append([h[y] for h in hist])
    length = min(len(v) for v in ys)           # runs stopped early are cut to the shortest
    xs = np.array([v[:length] for v in xs], np.float64)
    ys = np.array([v[:length] for v in ys], np.float64)
    std = ys.std(0) if len(runs) > 1 else None
    return xs.mean(0), ys.mean(0), std, len(runs)


# -- per-client metrics -------------------------------------------------------------------------

def client_table(sums: dict) -> dict:
    """{"<split>_accuracy": [N], "<split>_count": [N]} from the driver's per-client evaluation sums
    (`core.evaluate.evaluation_sums`: {split: (loss_sum, correct_sum, count)}); a client without
    examples in a split has accuracy None."""
    out = {}
    for name, (_, correct, count) in sums.items():
        correct, count = np.asarray(correct, np.float64), np.asarray(count, np.float64)
        out[f"{name}_accuracy"] = [float(c / n) if n > 0 else None for c, n in zip(correct, count)]
        out[f"{name}_count"] = count.tolist()
    return out


def client_metrics(alg, state, data) -> dict:
    """`client_table` of every evaluation the driver reports (test, test_personal, test_adapted,
    train, train_personal) for `state`."""
    import jax
    from fedjax_lab.core import driver
    adapt = alg.adapt_split(data) if getattr(alg, "adapt", None) is not None else None
    return client_table(jax.device_get(driver.evaluate(alg, state, data, adapt)))


def write_client_sums(out: str, sums: dict) -> str:
    """Write `client_table(sums)` to out/clients.json (what `--hist` reads)."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, CLIENTS_FILE)
    with open(path, "w") as f:
        json.dump(client_table(sums), f)
    return path


def write_client_metrics(out: str, alg, state, data) -> str:
    """Evaluate `state` and write every client's accuracies to out/clients.json."""
    import jax
    from fedjax_lab.core import driver
    adapt = alg.adapt_split(data) if getattr(alg, "adapt", None) is not None else None
    return write_client_sums(out, jax.device_get(driver.evaluate(alg, state, data, adapt)))


def client_values(path: str, metric: str) -> np.ndarray:
    """Per-client values of `metric` in RUN_DIR's clients.json (pooled over a sweep's runs)."""
    values = []
    for run in run_dirs_of(path):
        file = os.path.join(run, CLIENTS_FILE)
        if not os.path.isfile(file):
            raise ValueError(f"{run}: no {CLIENTS_FILE}; per-client histograms need it: call "
                             "fedjax_lab.plot.write_client_metrics(out, alg, state, data) after the run")
        with open(file) as f:
            table = json.load(f)
        if metric not in table:
            raise ValueError(f"{run}: {CLIENTS_FILE} has no {metric!r}; it has "
                             f"{sorted(k for k in table if k.endswith('_accuracy'))}")
        values += [v for v in table[metric] if v is not None]
    return np.asarray(values, np.float64)


# -- drawing ------------------------------------------------------------------------------------

def _label(path: str, labels, i: int) -> str:
    if labels:
        return labels[i]
    return os.path.basename(os.path.normpath(path)) or path


def plot_curves(paths, *, x: str = "round", y=("test_accuracy",), labels=None, title=None):
    """A matplotlib Figure: one panel per metric in `y`, one curve (mean +- std) per RUN_DIR."""
    import matplotlib.pyplot as plt
    y = list(y)
    fig, axes = plt.subplots(1, len(y), figsize=(4.6 * len(y), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], y):
        for i, path in enumerate(paths):
            for differing, runs in configurations(path):
                xs, mean, std, n = curve(runs, x, metric)
                label = " ".join([_label(path, labels, i)] + [f"{k}={v}" for k, v in differing.items()])
                label += f" ({n} seeds)" if n > 1 else ""
                (line,) = ax.plot(xs, mean, label=label)
                if std is not None:
                    ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        ax.set_xlabel(X_ALIASES.get(x, x).replace("_", " "))
        ax.set_ylabel(metric.replace("_", " "))
        if x in X_ALIASES or x.startswith("total_bytes"):
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_histograms(paths, *, y=None, labels=None, title=None, bins: int = 20):
    """A matplotlib Figure: per-client accuracy histograms, one panel per metric, one colour per RUN_DIR."""
    import matplotlib.pyplot as plt
    if not y:
        y = ["test_accuracy"]
        try:
            client_values(paths[0], "test_personal_accuracy")
            y.append("test_personal_accuracy")
        except ValueError:
            pass
    fig, axes = plt.subplots(1, len(y), figsize=(4.6 * len(y), 3.4), squeeze=False)
    edges = np.linspace(0.0, 1.0, bins + 1)
    for ax, metric in zip(axes[0], y):
        for i, path in enumerate(paths):
            v = client_values(path, metric)
            ax.hist(v, bins=edges, alpha=0.5,
                    label=f"{_label(path, labels, i)} (mean {v.mean():.3f}, p10 {np.percentile(v, 10):.3f})")
        ax.set_xlabel(f"per-client {metric.replace('_', ' ')}")
        ax.set_ylabel("clients")
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def cmd_plot(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="fedjax-lab plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--x", default="round", help="round (default), bytes_up, bytes_down or a metric")
    p.add_argument("--y", nargs="+", default=None, help="metrics, one panel each (default test_accuracy)")
    p.add_argument("--hist", action="store_true", help="per-client accuracy histograms (clients.json)")
    p.add_argument("--labels", nargs="+", default=None, help="one legend label per RUN_DIR")
    p.add_argument("--title", default=None)
    p.add_argument("--out", required=True, help="FIG.png or FIG.svg")
    args = p.parse_args(argv)
    ext = os.path.splitext(args.out)[1].lower()
    if ext not in (".png", ".svg", ".pdf"):
        raise SystemExit(f"error: --out must end in .png, .svg or .pdf, got {args.out!r}")
    if args.labels is not None and len(args.labels) != len(args.runs):
        raise SystemExit(f"error: --labels needs one label per RUN_DIR ({len(args.runs)}), "
                         f"got {len(args.labels)}")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    try:
        if args.hist:
            fig = plot_histograms(args.runs, y=args.y, labels=args.labels, title=args.title)
        else:
            fig = plot_curves(args.runs, x=args.x, y=args.y or ["test_accuracy"], labels=args.labels,
                              title=args.title)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=120)
    plt.close(fig)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(cmd_plot())
