"""What `fedjax-lab run NAME` gives with its defaults: the README algorithm table's last column.

    python experiments/defaults_table.py                  # every registered name (7-10 min, 2 CPU cores)
    python experiments/defaults_table.py --only fedmeta_maml,fedgen --rounds 60

Each row is exactly `fedjax-lab run NAME --dataset digits:shards=2,clients=20 --rounds 60 --seed 0`
(scikit-learn digits, McMahan shards: 2 labels per client), no other flag: the algorithm's default
model and hyperparameters. The headline metric is the one its paper reports: `test_adapted_accuracy`
(after the meta-learner's adaptation) where the algorithm adapts, else `test_personal_accuracy`
where it personalizes, else the global model's `test_accuracy`; each is the example-weighted
accuracy on every client's test split. FedAvg's global model on the same data is the reference;
FedGen is also run on `digits:dirichlet=0.1,clients=20` against FedAvg there (its paper's claim is
about the global model under label skew).

Prints a markdown table (name, metric, accuracy, margin over FedAvg, seconds) and writes it as JSON
to --out (default /tmp/defaults_table.json).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time

SHARDS = "digits:shards=2,clients=20"
DIRICHLET = "digits:dirichlet=0.1,clients=20"
# Where the paper's claim is about the global model under label skew, it is also checked there.
ALSO_ON_DIRICHLET = ("fedgen",)
KIND = {"test_adapted_accuracy": "adapted", "test_personal_accuracy": "personalized",
        "test_accuracy": "global"}


def headline(row: dict) -> tuple[str, float]:
    """(metric name, value) of the metric a paper of this kind reports, from a metrics row."""
    for key in ("test_adapted_accuracy", "test_personal_accuracy", "test_accuracy"):
        if key in row:
            return key, float(row[key])
    raise ValueError(f"no test accuracy in the metrics row: keys {sorted(row)}")


def run_default(name: str, dataset: str, *, rounds: int, seed: int = 0) -> dict:
    """The last metrics row of `fedjax-lab run NAME --dataset DATASET --rounds R --seed S`."""
    from fedjax_lab import cli
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()):
        cli.main(["run", name, "--dataset", dataset, "--rounds", str(rounds), "--seed", str(seed),
                  "--eval-every", str(rounds), "--no-progress", "--out", out])
        with open(os.path.join(out, "metrics.jsonl")) as f:
            return [json.loads(line) for line in f][-1]


def main(argv=None) -> list:
    from fedjax_lab.algorithms import ALGORITHMS
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default=None, help="comma-separated names (default: every one)")
    ap.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "defaults_table.json"))
    args = ap.parse_args(argv)
    names = sorted(ALGORITHMS) if args.only is None else [n.strip() for n in args.only.split(",")]
    unknown = [n for n in names if n not in ALGORITHMS]
    if unknown:
        raise SystemExit(f"error: --only: unknown algorithm(s) {unknown}; valid: {sorted(ALGORITHMS)}")
    jobs = [(n, SHARDS) for n in ["fedavg"] + [n for n in names if n != "fedavg"]]
    if any(n in ALSO_ON_DIRICHLET for n in names):
        jobs += [("fedavg", DIRICHLET)] + [(n, DIRICHLET) for n in names if n in ALSO_ON_DIRICHLET]
    rows, ref = [], {}
    for name, dataset in jobs:
        t0 = time.time()
        try:
            metric, acc = headline(run_default(name, dataset, rounds=args.rounds, seed=args.seed))
        except SystemExit as e:       # the CLI's error: a row of the table too
            print(f"{name:>18} {dataset:<28} fails: {e}", file=sys.stderr, flush=True)
            rows.append(dict(name=name, dataset=dataset, metric="fails", accuracy=float("nan"),
                             fedavg=ref.get(dataset), margin=float("nan"), seconds=0.0,
                             error=str(e)))
            continue
        seconds = time.time() - t0
        if name == "fedavg":
            ref[dataset] = acc
        rows.append(dict(name=name, dataset=dataset, metric=metric, accuracy=acc,
                         fedavg=ref[dataset], margin=acc - ref[dataset], seconds=seconds))
        print(f"{name:>18} {dataset:<28} {metric:<24} {acc:.3f} ({acc - ref[dataset]:+.3f} vs "
              f"FedAvg) [{seconds:.0f} s]", file=sys.stderr, flush=True)
    print(f"\n`fedjax-lab run NAME --dataset D --rounds {args.rounds} --seed {args.seed}`, defaults "
          f"only; FedAvg = its global model on the same D\n")
    print("| algorithm | dataset | metric | accuracy | vs FedAvg | s |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | `{r['dataset']}` | {KIND.get(r['metric'], r['metric'])} "
              f"| {r['accuracy']:.3f} | {r['margin']:+.3f} | {r['seconds']:.0f} |")
    with open(args.out, "w") as f:
        json.dump(dict(rounds=args.rounds, seed=args.seed, rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
