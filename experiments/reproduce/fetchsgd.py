"""Reproduce FetchSGD's comparison (Rothchild et al., ICML 2020, Figs. 3-6 style): test accuracy
against total bytes uploaded for FetchSGD and its baselines, on a small non-iid task, offline.

Methods (all: one local gradient per client per round, server momentum rho = 0.9, lr 0.1):
  * uncompressed momentum SGD (FedOpt: client lr 1, one step -> server SGD+momentum on the mean g)
  * FetchSGD, sketch >= `--ratio` times smaller than the model:
      - masking="zero_cells" (the official code's error feedback; trains at this compression)
      - masking="subtract"   (the paper's Algorithm 1 as printed)
      - second_round=True    (exact current-round values for 2k candidates, code's masking)
  * local top-k with error feedback, and without, at FetchSGD's upload bytes (8k = 4 r c)
  * FedAvg (same one-step momentum SGD) with fewer clients per round at equal upload bytes
The upload compression of each method is total uncompressed bytes / its total bytes at equal rounds.

Writes experiments/reproduce/figures/fetchsgd.png and prints a table. Measured with the defaults
(digits, 2 label shards per client, 100 clients, 10 per round, MLP 64, d = 4,810, 1000 rounds;
final test accuracy, upload compression): SGD-M 0.985 (1x); FetchSGD zero-cells 0.947 (10x);
FetchSGD paper's subtract: diverges at round 20; FetchSGD second round 0.970 (7.1x); local top-k +
EF 0.985 (10x); local top-k without EF 0.972 (10x); FedAvg with 1 client/round 0.552 (10x).
So on this small task FetchSGD stays within 0.015-0.04 of uncompressed SGD-M at 7-10x less upload
and far above FedAvg with fewer clients at equal bytes, but local top-k (with, and here even
without, error feedback) matches or beats it at equal bytes: the paper's advantage needs large
models whose gradients have heavy hitters and clients that rarely return (stale local errors).

PASS: FetchSGD (code's zero-cells masking) ends within 0.06 of uncompressed SGD-M's test accuracy
at >= 5x less upload, and above FedAvg with fewer clients per round at equal upload bytes. With
--seeds N the numbers are means over seeds 0 .. N-1; the figure shows seed 0.

    python experiments/reproduce/fetchsgd.py            # small: 300 rounds
    python experiments/reproduce/fetchsgd.py --full     # the numbers above: 1000 rounds
    python experiments/reproduce/fetchsgd.py [--rounds 1000] [--dataset digits:shards=2,clients=100]
"""
from __future__ import annotations

import os
import time

import jax
import numpy as np

import fedjax_lab as fl
from fedjax_lab import Setup
from fedjax_lab.algorithms import fedopt, fetchsgd, local_topk
from fedjax_lab.core.tree import flatten
from fedjax_lab.reproduce import finish, output_paths, protocol_parser

CLAIM = ("FetchSGD trains within a few points of uncompressed momentum SGD at ~10x less upload, "
         "and beats FedAvg with fewer clients per round at equal upload bytes (Rothchild et al., ICML 2020).")

HERE = os.path.dirname(os.path.abspath(__file__))


def methods(model, d, *, ratio, clients, batch, lr=0.1, rho=0.9, rows=1):
    cols = d // (ratio * rows)
    cells = rows * cols
    k = cols // 5                                         # c / k = 5 (the paper's CIFAR runs: 10)
    few = max(1, round(clients * cells / d))               # equal upload bytes: C r c = C' d
    # FetchSGD's and local top-k's defaults: one gradient (client lr 1), uniform weights
    shared = Setup.of(clients_per_round=clients, batch_size=batch, server_lr=lr,
                      server_momentum=rho)
    sgdm = lambda c: Setup.of(clients_per_round=c, client_lr=1.0, local_steps=1, batch_size=batch,
                              server_lr=lr, server_momentum=rho, weighting="uniform")
    sk = dict(k=k, sketch_rows=rows, sketch_cols=cols, setup=shared)
    out = {
        "uncompressed SGD-M": fedopt(model, setup=sgdm(clients)),
        f"FetchSGD (code's zero-cells) k={k}": fetchsgd(model, masking="zero_cells", **sk),
        f"FetchSGD (paper's subtract) k={k}": fetchsgd(model, masking="subtract", **sk),
        "FetchSGD 2nd round, 2k cand.": fetchsgd(model, masking="zero_cells", second_round=True,
                                                 num_candidates=2 * k, **sk),
        f"local top-k + EF, k={cells // 2}": local_topk(model, k=cells // 2, setup=shared),
        f"local top-k, no EF, k={cells // 2}": local_topk(model, k=cells // 2,
                                                          error_feedback=False, setup=shared),
        f"FedAvg-SGD-M, {few} client(s)/round": fedopt(model, setup=sgdm(few)),
    }
    return out, dict(rows=rows, cols=cols, k=k, cells=cells, few=few)


def main(argv=None):
    p = protocol_parser(__doc__)
    p.add_argument("--dataset", default="digits:shards=2,clients=100")
    p.add_argument("--hidden", default="64", help="MLP hidden sizes, comma separated")
    p.add_argument("--ratio", type=int, default=10, help="model size / sketch size")
    p.add_argument("--rounds", type=int, default=None, help="300; --full 1000")
    p.add_argument("--clients-per-round", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=50)
    args = p.parse_args(argv)
    args.rounds = args.rounds or (1000 if args.full else 300)
    figure, metrics_path = output_paths(args.out, "fetchsgd", args.full)
    per_seed = [run_seed(args, seed) for seed in range(args.seeds or 1)]
    names = list(per_seed[0][0])
    numbers = {}
    for name in names:
        runs = [curves[name][0] for curves, _ in per_seed]
        if any(not hist for hist in runs):
            numbers[f"acc {name}"] = float("nan")
            continue
        numbers[f"acc {name}"] = float(np.mean([hist[-1]["test_accuracy"] for hist in runs]))
        numbers[f"upload x {name}"] = float(np.mean([
            curves["uncompressed SGD-M"][0][-1]["total_bytes_up"] / curves[name][0][-1]["total_bytes_up"]
            for curves, _ in per_seed]))
    curves, title = per_seed[0]
    fetch = next(n for n in names if n.startswith("FetchSGD (code's"))
    few = next(n for n in names if n.startswith("FedAvg-SGD-M"))
    acc = lambda n: numbers[f"acc {n}"]
    passed = bool(acc(fetch) >= acc("uncompressed SGD-M") - 0.06 and acc(fetch) > acc(few)
                  and numbers.get(f"upload x {fetch}", 0.0) >= 5.0)
    plot(curves, title, figure)
    print(f"\nwrote {figure} and {metrics_path}")
    return finish(CLAIM, numbers, passed, metrics_path,
                  extra=dict(rounds=args.rounds, dataset=args.dataset, seeds=len(per_seed)))


def run_seed(args, seed):
    data = fl.data.load(args.dataset, seed=seed)
    model = fl.models.mlp(data.num_classes, hidden=tuple(int(h) for h in args.hidden.split(",")))
    d = flatten(model.init(jax.random.key(0), data.x[:1]))[0].shape[0]
    algs, sk = methods(model, d, ratio=args.ratio, clients=args.clients_per_round,
                       batch=args.batch_size)
    print(f"{args.dataset}: {data.num_clients} clients, MLP {args.hidden} (d = {d:,}); sketch "
          f"{sk['rows']} x {sk['cols']} = {sk['cells']:,} cells: {d / sk['cells']:.1f}x smaller "
          f"than the model; {args.clients_per_round} clients/round, {args.rounds} rounds, seed {seed}")
    curves = {}
    for name, alg in algs.items():
        t = time.time()
        try:
            hist = fl.run(alg, data, rounds=args.rounds, key=seed,
                          eval_every=args.eval_every, progress=False).history
            status = ""
        except FloatingPointError as e:
            hist, status = [], f"diverged ({e})"
        curves[name] = (hist, status, time.time() - t)

    base = curves["uncompressed SGD-M"][0][-1]["total_bytes_up"]
    print(f"\n{'method':40s} {'test acc':>8s} {'best':>6s} {'MB up':>8s} {'upload x':>8s}")
    for name, (hist, status, secs) in curves.items():
        if not hist:
            print(f"{name:40s} {status}")
            continue
        acc = [h["test_accuracy"] for h in hist]
        up = hist[-1]["total_bytes_up"]
        print(f"{name:40s} {acc[-1]:8.3f} {max(acc):6.3f} {up / 1e6:8.2f} {base / up:8.1f}x"
              f"   ({secs:.0f} s)")
    title = (f"FetchSGD vs baselines, {args.dataset}, MLP d={d:,}, sketch "
             f"{d / sk['cells']:.0f}x smaller than the model")
    return curves, title


def plot(curves, title, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (name, (hist, status, _)) in enumerate(curves.items()):
        color = f"C{i}"                              # one color per method in both panels
        if not hist:
            axes[0].plot([], [], color=color, label=f"{name}: diverged")
            continue
        up = np.array([h["total_bytes_up"] for h in hist]) / 1e6
        acc = np.array([h["test_accuracy"] for h in hist])
        axes[0].plot(up, acc, color=color, label=name)
        axes[1].plot([h["round"] for h in hist], acc, color=color, label=name)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("total bytes uploaded (MB, log)")
    axes[1].set_xlabel("round")
    for ax in axes:
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
