"""Per-FedAvg (Fallah et al., NeurIPS 2020, Sec. 5), CPU-sized: personalized test accuracy after one
alpha-step on each client's train split, Per-FedAvg FO and HF vs FedAvg, on training clients and on
new clients, over rounds.

    python experiments/reproduce/perfedavg.py                    # ~5 min on 2 CPU cores
    python experiments/reproduce/perfedavg.py --quick            # 1 seed, fewer rounds, logistic

Data: scikit-learn digits (1,797 real 8x8 images, no download), pathological non-iid split
(McMahan shards, 2 classes per client) over 50 clients; core/meta.py's client roles put 40 in
training and 10 aside as new clients (fractions 0.8 / 0 / 0.2); every client holds out 25% of its
examples as its test split. Rows:
  FedAvg              the global model, no adaptation
  FedAvg + alpha-step FedAvg's model after the same alpha-step as Per-FedAvg's evaluation
  Per-FedAvg FO / HF  the Per-FedAvg model after the alpha-step (HF: delta = --hvp-delta)
  Per-FedAvg exact    HF with the exact Hessian-vector product (a check of HF)
The alpha-step is one full-batch step w - alpha grad f_i(w) on the client's train split (Per-FedAvg's
default `alg.adapt`); test data is never used to adapt. All runs share the setup: C = 10 clients
per round, tau local steps of batch B (Per-FedAvg: three batches per step), client lr beta,
uniform averaging, server SGD at lr 1. Seeds are vmapped: one compiled program per algorithm.

Writes experiments/reproduce/figures/perfedavg.png and runs/reproduce_perfedavg/results.json and
prints the final accuracies (mean and std over seeds).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab import Setup, models
from fedjax_lab import data as D
from fedjax_lab.algorithms import fedavg, perfedavg_fo, perfedavg_hf
from fedjax_lab.core import driver, meta

ROWS = (("fedavg", "FedAvg (global)", "o-"), ("fedavg_step", "FedAvg + alpha-step", "s--"),
        ("fo", "Per-FedAvg FO", "^-"), ("hf", "Per-FedAvg HF", "v-"),
        ("exact", "Per-FedAvg exact HVP", "x:"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--model", default="logistic", choices=("logistic", "mlp"))
    ap.add_argument("--inner-lr", type=float, default=0.3, help="alpha")
    ap.add_argument("--client-lr", type=float, default=0.1, help="beta")
    ap.add_argument("--hvp-delta", type=float, default=1e-2)
    ap.add_argument("--local-steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="runs/reproduce_perfedavg")
    ap.add_argument("--figure", default=os.path.join(os.path.dirname(__file__), "figures",
                                                     "perfedavg.png"))
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.seeds = 40, 1

    d = D.digits(num_clients=50, partition="shards=2", seed=0, test_fraction=0.25)
    train_ids, _, new_ids = meta.client_roles(50, (0.8, 0.0, 0.2), seed=0)
    train = meta.select_clients(d, train_ids)
    model = models.logistic(10) if args.model == "logistic" else models.mlp(10, hidden=(64,))
    setup = Setup.of(client_lr=args.client_lr, clients_per_round=10, local_steps=args.local_steps,
                     batch_size=args.batch_size, weighting="uniform")
    own = dict(inner_lr=args.inner_lr, setup=setup)
    fo = perfedavg_fo(model, **own)
    algs = {"fedavg": fedavg(model, setup=setup), "fo": fo,
            "hf": perfedavg_hf(model, hvp_delta=args.hvp_delta, **own),
            "exact": perfedavg_hf(model, hessian="exact", **own)}
    adapts = {"fedavg": meta.no_adapt(lambda st: st.params), "fedavg_step": fo.adapt,
              "fo": fo.adapt, "hf": algs["hf"].adapt, "exact": algs["exact"].adapt}
    seeds = jnp.arange(args.seeds)
    chunks = args.rounds // args.eval_every
    curves = {name: {"train": [], "new": []} for name, _, _ in ROWS}
    t0 = time.time()
    for name, alg in algs.items():
        run_chunk = jax.jit(jax.vmap(lambda st, seed, first: driver.run_rounds(
            alg, st, train, jax.random.key(seed + 100), first, args.eval_every)[0],
            in_axes=(0, 0, None)))
        states = jax.jit(jax.vmap(lambda seed: alg.init(jax.random.key(seed), train)))(seeds)
        evals = {row: jax.jit(jax.vmap(lambda st, a=adapts[row]: meta.adapted_sums(
            model, a, st, d, d.test))) for row in (["fedavg", "fedavg_step"] if name == "fedavg"
                                                    else [name])}
        for c in range(chunks):
            states = run_chunk(states, seeds, jnp.int32(c * args.eval_every))
            for row, ev in evals.items():
                _, correct, count = jax.device_get(ev(states))
                for role, ids in (("train", train_ids), ("new", new_ids)):
                    curves[row][role].append((correct[:, ids].sum(1) / count[:, ids].sum(1)).tolist())
        print(f"{name:>7} done [{time.time() - t0:.0f} s]", flush=True)
    rounds = [(c + 1) * args.eval_every for c in range(chunks)]
    print(f"\nfinal personalized test accuracy after {args.rounds} rounds, {args.seeds} seed(s), "
          f"{args.model}, alpha={args.inner_lr}, beta={args.client_lr}, delta={args.hvp_delta}")
    print(f"{'':>22} {'training clients':>18} {'new clients':>18}")
    final = {}
    for row, label, _ in ROWS:
        tr, nw = (np.asarray(curves[row][r][-1]) for r in ("train", "new"))
        final[row] = dict(train_mean=float(tr.mean()), train_std=float(tr.std()),
                          new_mean=float(nw.mean()), new_std=float(nw.std()))
        print(f"{label:>22} {tr.mean():>11.3f} ± {tr.std():.3f} {nw.mean():>11.3f} ± {nw.std():.3f}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(dict(args=vars(args), rounds=rounds, curves=curves, final=final), f, indent=1)
    plot(rounds, curves, args.figure)
    print(f"wrote {args.figure} and {os.path.join(args.out, 'results.json')}")


def plot(rounds, curves, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
    for ax, role, title in zip(axes, ("train", "new"), ("training clients", "new clients")):
        for row, label, style in ROWS:
            acc = np.asarray(curves[row][role])            # [evals, seeds]
            ax.plot(rounds, acc.mean(1), style, label=label, markersize=4)
            if acc.shape[1] > 1:
                ax.fill_between(rounds, acc.min(1), acc.max(1), alpha=0.15)
        ax.set_title(f"digits, 2 labels/client: {title}")
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy after the alpha-step")
    axes[1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
