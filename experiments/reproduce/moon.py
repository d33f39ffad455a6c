"""MOON (Li, He, Song, CVPR 2021), Table 1 shaped, CPU-sized: the global model's test accuracy of
MOON vs FedAvg under a heterogeneous Dirichlet label split (the paper: CIFAR-10/100 and
Tiny-ImageNet, beta = 0.5, 10 parties, 10 local epochs; MOON +1 to +7 points over FedAvg).

Data: scikit-learn digits (1,797 real 8x8 images, no download), Dirichlet(--alpha) over 20
clients, 10 sampled per round, each test split partitioned like its training split. Model: the
mlp (200-200, features = the last hidden layer: MOON's representation; the paper adds a projection
head on a CNN/ResNet encoder). MOON's mu, tau and client lr are its defaults
(`fedjax-lab run moon`); FedAvg runs with the same setup (MOON with mu = 0 is FedAvg bit for bit).
PASS: MOON's final test accuracy (mean over seeds) is above FedAvg's by at least one point
(MARGIN; the paper's smallest gain over FedAvg in Table 1 is 2.1 points), for every alpha.

    python experiments/reproduce/moon.py              # alpha 0.1, 40 rounds, 2 seeds (~1-2 min)
    python experiments/reproduce/moon.py --full       # alpha 0.1 and 0.5, 100 rounds, 3 seeds
"""
from __future__ import annotations

import time

import numpy as np

from fedjax_lab import Setup, data as fdata, models, run
from fedjax_lab.algorithms import fedavg, moon
from fedjax_lab.reproduce import default_of, fill_sizes, finish, output_paths, protocol_parser

CLAIM = ("MOON's model-contrastive local loss gives a more accurate global model than FedAvg under "
         "a heterogeneous (Dirichlet) label split (Li et al., CVPR 2021, Table 1).")
MARGIN = 0.01


def main(argv=None):
    ap = protocol_parser(__doc__, seeds=2)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--alphas", type=float, nargs="+", default=None)
    args = fill_sizes(ap.parse_args(argv), small=dict(rounds=40, seeds=2, alphas=[0.1]),
                      full=dict(rounds=100, seeds=3, alphas=[0.1, 0.5]))
    figure, metrics_path = output_paths(args.out, "moon", args.full)
    flat = dict(clients_per_round=10, local_steps=50, batch_size=16,
                client_lr=default_of(moon, "client_lr"))
    mu, tau = default_of(moon, "mu"), default_of(moon, "tau")
    curves, numbers, t0 = {}, {}, time.time()
    for alpha in args.alphas:
        for seed in range(args.seeds):
            data = fdata.load(f"digits:dirichlet={alpha},clients=20", seed=seed)
            model = models.mlp(10)
            for name, alg in (("fedavg", fedavg(model, setup=Setup.of(**flat))),
                              ("moon", moon(model, mu=mu, tau=tau, setup=Setup.of(**flat)))):
                h = run(alg, data, rounds=args.rounds, key=seed, eval_every=args.rounds // 10,
                        progress=False).history
                curves.setdefault((alpha, name), []).append([r["test_accuracy"] for r in h])
                print(f"alpha {alpha} seed {seed} {name:>6}: test acc {h[-1]['test_accuracy']:.3f} "
                      f"(p10 {h[-1]['test_accuracy_p10']:.3f})  [{time.time() - t0:.0f} s]", flush=True)
        for name in ("fedavg", "moon"):
            numbers[f"alpha {alpha} {name} test_accuracy"] = float(
                np.mean([c[-1] for c in curves[(alpha, name)]]))
    acc = lambda alpha, name: numbers[f"alpha {alpha} {name} test_accuracy"]
    for alpha in args.alphas:
        numbers[f"alpha {alpha} moon - fedavg"] = acc(alpha, "moon") - acc(alpha, "fedavg")
        print(f"alpha {alpha}: FedAvg {acc(alpha, 'fedavg'):.4f}  MOON (mu={mu}, tau={tau}) "
              f"{acc(alpha, 'moon'):.4f}  difference {numbers[f'alpha {alpha} moon - fedavg']:+.4f}")
    passed = all(acc(a, "moon") > acc(a, "fedavg") + MARGIN for a in args.alphas)
    plot(curves, args.rounds, figure)
    print(f"wrote {figure} and {metrics_path}")
    return finish(CLAIM, numbers, passed, metrics_path,
                  extra=dict(rounds=args.rounds, seeds=args.seeds, mu=mu, tau=tau, setup=flat,
                             curves={f"{a} {n}": c for (a, n), c in curves.items()}))


def plot(curves, rounds, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for (alpha, name), c in sorted(curves.items()):
        mean = np.mean(c, axis=0)
        ax.plot(np.linspace(rounds / len(mean), rounds, len(mean)), mean,
                "-" if name == "moon" else "--", label=f"{name} (alpha {alpha})")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (global model)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle("MOON vs FedAvg, digits Dirichlet split, mlp", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
