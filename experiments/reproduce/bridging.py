"""Reproduce the point of Chen et al., "Bridging median- and mean-based algorithms" (NeurIPS 2020):
under heterogeneous data signSGD and medianSGD converge to a point biased away from the mean's
stationary point; perturbing the local gradients with noise before the sign / median closes the
gap (the gap shrinks as sigma grows, at the price of variance).

Two problems, both offline and CPU-sized:
  1. Heterogeneous quadratics f_i(x) = 1/2 (x - a_i)^2, a = (0, 0, 0, 1, 4): the mean's optimum is
     x* = mean(a) = 1, the median's fixed point median(a) = 0 (a known gap of 1). 5 clients, exact
     gradients, server step 0.01, 3000 rounds, 16 seeds. Reported: bias |E x - x*| and the spread
     (std) of x over the last 1000 rounds.
  2. scikit-learn digits, 10 clients holding one class each (`digits:shards=1,clients=10`, the
     paper's "1 class per node" setting with MNIST), multinomial logistic regression, one
     mini-batch gradient (32 examples) per client per round, all clients every round.
Writes bridging.png (bridging_small.png at the default size) and its metrics to --out and prints
both tables. PASS: on the quadratics noise sigma = 3 cuts both biases at least in half, and on
digits noisy signSGD / medianSGD (sigma = 0.3) beat their noiseless versions.

    python experiments/reproduce/bridging.py          # small: 60 digits rounds, 600 quadratic rounds, 4 seeds
    python experiments/reproduce/bridging.py --full   # the README's numbers: 600, 3000, 16 seeds
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import fedjax_lab as fl
from fedjax_lab import Setup
from fedjax_lab.algorithms import fedavg, mediansgd, signsgd
from fedjax_lab.reproduce import fill_sizes, finish, output_paths, protocol_parser

CLAIM = ("Under heterogeneous data signSGD and medianSGD are biased away from the mean's optimum, "
         "and perturbing each gradient with noise before the sign / median closes the gap "
         "(Chen et al., NeurIPS 2020).")

A = [[0.0], [0.0], [0.0], [1.0], [4.0]]
X_MEAN = 1.0
HERE = os.path.dirname(os.path.abspath(__file__))


def trajectories(alg, data, rounds: int, seeds: int):
    """[seeds, rounds] iterates x_t of independent runs (one jitted scan, vmapped over seeds)."""
    def one(seed):
        def body(s, r):
            s, _ = alg.round(s, data, jax.random.fold_in(jax.random.key(seed), r))
            return s, s.params["x"][0]
        return jax.lax.scan(body, alg.init(jax.random.key(0), data), jnp.arange(rounds))[1]
    return np.asarray(jax.jit(jax.vmap(one))(jnp.arange(seeds)))


def quadratic_methods(lr=0.01):
    m, kw = fl.models.quadratic(1), dict(clients_per_round=5, batch_size=2)
    out = {"SGD (mean)": fedavg(m, setup=Setup.of(client_lr=lr, local_steps=1, weighting="uniform",
                                                  **kw))}
    setup = Setup.of(server_lr=lr, **kw)
    out["signSGD"] = signsgd(m, setup=setup)
    for s in (0.5, 1.0, 3.0):
        out[f"noisy signSGD s={s:g}"] = signsgd(m, sigma=s, setup=setup)
    out["medianSGD"] = mediansgd(m, setup=setup)
    for s in (0.5, 1.0, 3.0):
        out[f"noisy medianSGD s={s:g}"] = mediansgd(m, sigma=s, setup=setup)
    out["noisy signSGD s=3 uniform, mean vote"] = signsgd(m, sigma=3.0, noise="uniform", vote="mean",
                                                          setup=setup)
    return out


def digits_methods():
    m = fl.models.logistic(10)
    kw = dict(clients_per_round=10, batch_size=32)
    out = {"SGD (mean)": fedavg(m, setup=Setup.of(client_lr=0.3, local_steps=1, weighting="uniform",
                                                  **kw))}
    for s in (0.0, 0.1, 0.3):
        out["signSGD" if s == 0 else f"noisy signSGD s={s:g}"] = signsgd(
            m, sigma=s, setup=Setup.of(server_lr=0.003, **kw))
    for s in (0.0, 0.1, 0.3):
        out["medianSGD" if s == 0 else f"noisy medianSGD s={s:g}"] = mediansgd(
            m, sigma=s, setup=Setup.of(server_lr=0.3, **kw))
    return out


def _style(label: str) -> dict:
    """One colour family per method (black SGD, reds sign, blues median), lighter = more noise."""
    import matplotlib.pyplot as plt
    if "SGD (mean)" in label:
        return {"color": "k", "ls": "-"}
    cmap = plt.get_cmap("Reds" if "signSGD" in label else "Blues")
    if "uniform" in label:
        return {"color": "tab:green", "ls": ":"}
    if "noisy" not in label:
        return {"color": cmap(0.95), "ls": "-"}
    shade = {0.1: 0.75, 0.3: 0.5, 0.5: 0.75, 1.0: 0.55, 3.0: 0.35}
    return {"color": cmap(shade.get(float(label.split("s=")[1].split()[0]), 0.5)), "ls": "--"}


def main(argv=None):
    p = protocol_parser(__doc__, seeds=4)
    p.add_argument("--rounds", type=int, default=None, help="digits rounds (60; --full 600)")
    p.add_argument("--quad-rounds", type=int, default=None, help="quadratic rounds (600; --full 3000)")
    p.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)   # the old name of the default
    args = p.parse_args(argv)
    fill_sizes(args, small=dict(rounds=60, quad_rounds=600, seeds=4),
               full=dict(rounds=600, quad_rounds=3000, seeds=16))
    figure, metrics_path = output_paths(args.out, "bridging", args.full)
    tail = args.quad_rounds // 3
    numbers = {}

    print(f"1) heterogeneous quadratics a = {[a[0] for a in A]}: mean optimum {X_MEAN}, median 0")
    qdata = fl.models.quadratic_clients(A)
    quad = {}
    print(f"{'method':40s} {'bias |E x - x*|':>16s} {'std x':>8s}   (last {tail} rounds, {args.seeds} seeds)")
    for label, alg in quadratic_methods().items():
        xs = trajectories(alg, qdata, args.quad_rounds, args.seeds)
        quad[label] = xs
        last = xs[:, -tail:]
        numbers[f"quad bias {label}"] = abs(last.mean() - X_MEAN)
        numbers[f"quad std {label}"] = last.std()
        print(f"{label:40s} {abs(last.mean() - X_MEAN):16.4f} {last.std():8.4f}")

    print("\n2) digits, 10 clients with one class each, logistic regression")
    data = fl.data.load("digits:shards=1,clients=10", seed=0)
    every = max(args.rounds // 20, 1)
    curves = {}
    print(f"{'method':28s} {'test acc':>8s} {'train loss':>10s} {'MB up/client':>12s} {'time':>6s}")
    for label, alg in digits_methods().items():
        t0 = time.time()
        hist = fl.run(alg, data, rounds=args.rounds, key=0, eval_every=every, progress=False).history
        curves[label] = hist
        h = hist[-1]
        numbers[f"digits acc {label}"] = h["test_accuracy"]
        print(f"{label:28s} {h['test_accuracy']:8.3f} {h['train_loss']:10.3f} "
              f"{h['total_bytes_up'] / data.num_clients / 1e6:12.4f} {time.time() - t0:5.1f}s")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    for label, xs in quad.items():
        dist = np.abs(xs - X_MEAN).mean(0)
        ax1.plot(np.arange(1, dist.size + 1), dist, label=label, lw=1.2, **_style(label))
    ax1.set_yscale("log")
    ax1.set_xlabel("round")
    ax1.set_ylabel("E |x_t - x*|  (x* = mean's optimum)")
    ax1.set_title("heterogeneous quadratics: noise closes the median-mean gap")
    ax1.legend(fontsize=7, ncol=2)
    for label, hist in curves.items():
        ax2.plot([h["round"] for h in hist], [h["test_accuracy"] for h in hist], label=label,
                 **_style(label))
    ax2.set_xlabel("round")
    ax2.set_ylabel("test accuracy")
    ax2.set_title("digits, one class per client")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(figure, dpi=120)
    plt.close(fig)
    b = lambda label: numbers[f"quad bias {label}"]
    acc = lambda label: numbers[f"digits acc {label}"]
    passed = (b("noisy signSGD s=3") < 0.5 * b("signSGD")
              and b("noisy medianSGD s=3") < 0.5 * b("medianSGD")
              and acc("noisy signSGD s=0.3") > acc("signSGD")
              and acc("noisy medianSGD s=0.3") > acc("medianSGD"))
    print(f"\nwrote {figure} and {metrics_path}")
    return finish(CLAIM, numbers, passed, metrics_path,
                  extra=dict(rounds=args.rounds, quad_rounds=args.quad_rounds, seeds=args.seeds))


if __name__ == "__main__":
    main()
