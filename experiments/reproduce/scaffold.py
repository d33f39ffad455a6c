"""SCAFFOLD (Karimireddy, Kale, Mohri, Reddi, Stich, Suresh, ICML 2020), Fig. 3 / Table 3 shaped,
CPU-sized: under client drift (strongly heterogeneous data, many local steps) SCAFFOLD needs fewer
rounds than FedAvg to reach a given training loss.

Data: scikit-learn digits (1,797 real 8x8 images, no download), McMahan shards with two classes
per client over 20 clients (digits:shards=2,clients=20). Model: logistic regression. Both run the
same setup and seeds: 5 clients per round, 20 local SGD steps of batch 10, uniform average (the
paper's, SCAFFOLD's default weighting), server lr 1, option II, client lr 0.05 (SCAFFOLD's
default, chosen so that 20 local steps drift: at 0.01 the gap is small, seed 0: 43 vs 50 rounds).
Measure: FedAvg's train loss after --rounds rounds (evaluated every round on all clients), and
the first round at which SCAFFOLD's train loss is at or below it.
PASS: for every seed SCAFFOLD gets there in at most 80% of FedAvg's rounds.

    python experiments/reproduce/scaffold.py          # 50 rounds, 2 seeds (~1 min)
    python experiments/reproduce/scaffold.py --full   # 150 rounds, 5 seeds

Writes scaffold_small.png / .json (scaffold.* with --full): train loss over rounds, seed 0.
"""
from __future__ import annotations

import time

import numpy as np

import fedjax_lab as fl
from fedjax_lab.algorithms import fedavg, scaffold
from fedjax_lab.reproduce import default_of, fill_sizes, finish, output_paths, protocol_parser

CLAIM = ("On a strongly heterogeneous split (two digit classes per client) with 20 local steps, "
         "SCAFFOLD reaches FedAvg's final training loss in fewer rounds than FedAvg "
         "(Karimireddy et al., ICML 2020).")
SPEEDUP = 0.8


def main(argv=None):
    ap = protocol_parser(__doc__, seeds=2)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--client-lr", type=float, default=default_of(scaffold, "client_lr"))
    ap.add_argument("--local-steps", type=int, default=default_of(scaffold, "local_steps"))
    ap.add_argument("--clients-per-round", type=int, default=5)
    args = fill_sizes(ap.parse_args(argv), small=dict(rounds=50, seeds=2),
                      full=dict(rounds=150, seeds=5))
    figure, metrics_path = output_paths(args.out, "scaffold", args.full)
    flat = dict(clients_per_round=args.clients_per_round, local_steps=args.local_steps,
                batch_size=default_of(scaffold, "batch_size"), client_lr=args.client_lr,
                weighting=default_of(scaffold, "weighting"))
    model = fl.models.logistic(10)
    t0, numbers, curves, ok = time.time(), {}, {}, True
    print("| seed | FedAvg loss after R | its rounds | SCAFFOLD rounds to it | SCAFFOLD loss after R "
          "| test acc FedAvg / SCAFFOLD |")
    print("|------|---------------------|------------|-----------------------|----------------------"
          "|----------------------------|")
    for seed in range(args.seeds):
        data = fl.data.load("digits:shards=2,clients=20", seed=seed)
        hist = {n: fl.run(f(model, setup=fl.Setup.of(**flat)), data, rounds=args.rounds, key=seed,
                          eval_every=1, progress=False).history
                for n, f in (("scaffold", scaffold), ("fedavg", fedavg))}
        loss = {n: np.array([r["train_loss"] for r in h]) for n, h in hist.items()}
        target = loss["fedavg"][-1]
        reach = lambda n: int(np.flatnonzero(loss[n] <= target)[0]) + 1 \
            if np.any(loss[n] <= target) else args.rounds + 1
        rounds = {n: reach(n) for n in loss}
        acc = {n: h[-1]["test_accuracy"] for n, h in hist.items()}
        numbers.update({f"seed {seed} fedavg final train loss": target,
                        f"seed {seed} scaffold final train loss": loss["scaffold"][-1],
                        f"seed {seed} fedavg rounds to it": rounds["fedavg"],
                        f"seed {seed} scaffold rounds to it": rounds["scaffold"],
                        f"seed {seed} fedavg test accuracy": acc["fedavg"],
                        f"seed {seed} scaffold test accuracy": acc["scaffold"]})
        ok &= rounds["scaffold"] <= SPEEDUP * rounds["fedavg"]
        if seed == 0:
            curves = loss
        print(f"| {seed:4d} | {target:19.4f} | {rounds['fedavg']:10d} | {rounds['scaffold']:21d} | "
              f"{loss['scaffold'][-1]:20.4f} | {acc['fedavg']:12.3f} / {acc['scaffold']:.3f}"
              f"{' ' * 7}|", flush=True)
    print(f"({time.time() - t0:.0f} s)")
    plot(curves, figure)
    print(f"wrote {figure} and {metrics_path}")
    return finish(CLAIM, numbers, bool(ok), metrics_path, extra=dict(rounds=args.rounds,
                                                                     seeds=args.seeds, **flat))


def plot(loss, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for name, label in (("fedavg", "FedAvg"), ("scaffold", "SCAFFOLD")):
        ax.plot(np.arange(1, len(loss[name]) + 1), loss[name], label=label)
    ax.axhline(loss["fedavg"][-1], color="gray", lw=0.8, ls=":")
    ax.set_xlabel("round")
    ax.set_ylabel("train loss")
    ax.set_title("digits, 2 classes per client, 20 local steps", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
