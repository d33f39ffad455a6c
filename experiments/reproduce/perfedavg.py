"""Per-FedAvg (Fallah et al., NeurIPS 2020, Sec. 5), CPU-sized: personalized test accuracy after one
alpha-step on each client's train split, Per-FedAvg FO and HF vs FedAvg, on training clients and on
new clients, over rounds.

    python experiments/reproduce/perfedavg.py                    # small: 1 seed, 40 rounds
    python experiments/reproduce/perfedavg.py --full             # ~5 min on 2 CPU cores: 100 rounds, 3 seeds

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

Writes perfedavg.png and perfedavg.json (perfedavg_small.* at the default size) to --out and
prints the final accuracies (mean and std over seeds). PASS: Per-FedAvg FO after its alpha-step
beats FedAvg's global model on both training and new clients (the comparison against FedAvg +
the same alpha-step, which ties here, is reported, not claimed).
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab import Setup, models
from fedjax_lab import data as D
from fedjax_lab.algorithms import fedavg, perfedavg_fo, perfedavg_hf
from fedjax_lab.core import driver, meta
from fedjax_lab.reproduce import default_of, finish, output_paths, protocol_parser

CLAIM = ("Per-FedAvg's model, after one alpha-step on a client's own data, is more accurate than "
         "FedAvg's global model on training clients and on new clients (Fallah et al., NeurIPS 2020).")

ROWS = (("fedavg", "FedAvg (global)", "o-"), ("fedavg_step", "FedAvg + alpha-step", "s--"),
        ("fo", "Per-FedAvg FO", "^-"), ("hf", "Per-FedAvg HF", "v-"),
        ("exact", "Per-FedAvg exact HVP", "x:"))


def parse(argv=None):
    ap = protocol_parser(__doc__)
    ap.add_argument("--rounds", type=int, default=None, help="40; --full 100")
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--model", default="logistic", choices=("logistic", "mlp"))
    # Per-FedAvg's settings are the factories' defaults (`fedjax-lab run perfedavg_fo` runs them)
    ap.add_argument("--inner-lr", type=float, default=default_of(perfedavg_fo, "inner_lr"),
                    help="alpha")
    ap.add_argument("--client-lr", type=float, default=default_of(perfedavg_fo, "client_lr"),
                    help="beta")
    ap.add_argument("--hvp-delta", type=float, default=default_of(perfedavg_hf, "hvp_delta"))
    ap.add_argument("--local-steps", type=int, default=default_of(perfedavg_fo, "local_steps"))
    ap.add_argument("--batch-size", type=int, default=default_of(perfedavg_fo, "batch_size"))
    ap.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)  # the old name of the default
    args = ap.parse_args(argv)
    args.rounds = args.rounds or (100 if args.full else 40)
    args.seeds = args.seeds or (3 if args.full else 1)
    return args


def main(argv=None):
    args = parse(argv)
    figure, metrics_path = output_paths(args.out, "perfedavg", args.full)

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
    numbers = {f"{row} {role} {stat}": final[row][f"{role}_{stat}"]
               for row, _, _ in ROWS for role in ("train", "new") for stat in ("mean", "std")}
    passed = (final["fo"]["train_mean"] > final["fedavg"]["train_mean"]
              and final["fo"]["new_mean"] > final["fedavg"]["new_mean"])
    plot(rounds, curves, figure)
    print(f"wrote {figure} and {metrics_path}")
    return finish(CLAIM, numbers, passed, metrics_path,
                  extra=dict(args=vars(args), rounds=rounds, curves=curves, final=final))


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
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
