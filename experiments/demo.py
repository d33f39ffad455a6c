"""The offline default (`make demo`): FedProx vs FedAvg on Synthetic(1,1) with 90% stragglers.

The FedProx paper's setting (Li et al., MLSys 2020, Sec. 5 and Fig. 1): 30 clients, 10 drawn per
round with p_k = n_k / n with replacement and a simple average (Algorithm 2), E = 20 local epochs,
batch 10, SGD lr 0.01, 200 rounds; 90% of the sampled clients are stragglers doing a random number
of epochs in [1, 20) (the official code's reading; the paper says [1, E]).
FedAvg drops the stragglers; FedProx keeps their partial work, with mu = 0 and mu = 1.
Prints a table and writes a plot (training loss and test accuracy over rounds).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import fedjax_lab as fl

METHODS = {
    "FedAvg (drop stragglers)": ("fedavg", {}),
    "FedProx mu=0": ("fedprox", {"mu": 0.0}),
    "FedProx mu=1": ("fedprox", {"mu": 1.0}),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--stragglers", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=5)
    args = p.parse_args(argv)

    data = fl.data.synthetic(1.0, 1.0, seed=args.seed)
    model = fl.models.logistic(data.num_classes)
    setup = fl.Setup.of(client_lr=0.01, clients_per_round=10, epochs=args.epochs, batch_size=10,
                        stragglers=args.stragglers, sampling="size", weighting="uniform")
    histories, rows = {}, []
    for label, (name, extra) in METHODS.items():
        factory = fl.algorithms.ALGORITHMS[name][0]
        alg = factory(model, setup=setup, **extra)
        t0 = time.perf_counter()
        res = fl.run(alg, data, rounds=args.rounds, key=args.seed, eval_every=args.eval_every,
                     out=os.path.join(args.out, name + ("_mu" + str(extra["mu"]) if extra else "")))
        secs = time.perf_counter() - t0
        histories[label] = res.history
        last = res.history[-1]
        rows.append((label, last["train_loss"], last["test_accuracy"],
                     max(h["test_accuracy"] for h in res.history), secs))

    print(f"\nSynthetic(1,1), {int(args.stragglers * 100)}% stragglers, {args.rounds} rounds, "
          f"E={args.epochs}, seed {args.seed}")
    print(f"{'method':<26}{'train loss':>12}{'test acc':>10}{'best acc':>10}{'seconds':>9}")
    for label, loss, acc, best, secs in rows:
        print(f"{label:<26}{loss:>12.4f}{acc:>10.4f}{best:>10.4f}{secs:>9.1f}")
    path = plot(histories, args.out)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump([dict(zip(("method", "train_loss", "test_accuracy", "best_test_accuracy",
                             "seconds"), r)) for r in rows], f, indent=2)
    print(f"plot: {path}")


def plot(histories, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for label, hist in histories.items():
        r = [h["round"] for h in hist]
        axes[0].plot(r, [h["train_loss"] for h in hist], label=label)
        axes[1].plot(r, [h["test_accuracy"] for h in hist], label=label)
    axes[0].set(xlabel="round", ylabel="training loss", title="Synthetic(1,1), 90% stragglers")
    axes[1].set(xlabel="round", ylabel="test accuracy")
    axes[0].legend()
    fig.tight_layout()
    path = os.path.join(out, "fedprox_vs_fedavg.png")
    fig.savefig(path, dpi=120)
    return path


if __name__ == "__main__":
    main()
