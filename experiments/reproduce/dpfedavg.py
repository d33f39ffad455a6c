"""DP-FedAvg (McMahan et al., ICLR 2018): per-client update clipping to norm S plus Gaussian noise
of std z S on the sum of the cohort's updates (divided by the expected cohort size) makes FedAvg
user-level differentially private; the accuracy cost grows with the noise multiplier z while
epsilon(delta) falls.

Setting (small, default): scikit-learn digits, 100 iid clients, 20 per round (uniform, without
replacement), logistic regression, 5 local SGD steps (lr 0.3, batch 16), S = 0.5, 60 rounds,
z in {0, 1, 4, 16}; z = 0 is the ablation (clipping, no noise); plain FedAvg (no clipping) and
adaptive clipping (Andrew et al. 2021, target quantile 0.5, z = 1) for reference. epsilon at
delta = 1e-5 from dp-accounting's RDP accountant, for the sampling the run uses (C of N without
replacement, replace-one) and for Poisson sampling with q = C / N (the paper's).
--full: the same 100 clients (digits has 1,797 examples), 200 rounds, 3 seeds, z in
{0, 0.5, 1, 2, 4, 8, 16}.

PASS: test accuracy strictly falls from z = 1 to z = 4 to z = 16, z = 16 loses more than 0.3 of
the z = 0 accuracy, and epsilon strictly falls as z grows.

    python experiments/reproduce/dpfedavg.py [--full] [--seeds N] [--out DIR]
"""
from __future__ import annotations

import time

import numpy as np

import fedjax_lab as fl
from fedjax_lab.algorithms import fedavg
from fedjax_lab.aggregators import privacy
from fedjax_lab.reproduce import finish, output_paths, protocol_parser

CLAIM = ("DP-FedAvg (clip each client's update to S, add N(0, (z S)^2) to the sum): accuracy falls "
         "as the noise multiplier z grows while epsilon(delta) falls (McMahan et al. 2018).")
N, C, S, DELTA = 100, 20, 0.5, 1e-5


def setup(aggregator):
    return fl.Setup(cohort=fl.Cohort(C), work=fl.LocalWork(batch_size=16, local_steps=5),
                    client_opt=fl.Optimizer("sgd", lr=0.3), aggregator=aggregator)


def final_accuracy(alg, data, rounds, seed):
    res = fl.run(alg, data, rounds=rounds, key=seed, eval_every=max(rounds // 6, 1), progress=False)
    return res.history


def accuracies(noise_multipliers=(0.0, 1.0, 4.0, 16.0), seeds=(0,), rounds=60, curves=None):
    """{z: mean final test accuracy over seeds}; `curves` (a dict) collects the histories."""
    data = fl.data.load(f"digits:iid,clients={N}", seed=0)
    out = {}
    for z in noise_multipliers:
        alg = fedavg(fl.models.logistic(10), setup=setup(fl.aggregators.dp_mean(z, S, delta=DELTA)))
        hist = [final_accuracy(alg, data, rounds, s) for s in seeds]
        out[z] = float(np.mean([h[-1]["test_accuracy"] for h in hist]))
        if curves is not None:
            curves[f"z = {z:g}"] = hist
    return out


def main(argv=None):
    p = protocol_parser(__doc__)
    p.add_argument("--rounds", type=int, default=None, help="default 60; --full: 200")
    p.add_argument("--z", nargs="+", type=float, default=None,
                   help="noise multipliers (default 0 1 4 16; --full: 0 0.5 1 2 4 8 16)")
    args = p.parse_args(argv)
    rounds = args.rounds or (200 if args.full else 60)
    zs = args.z or ([0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0] if args.full else [0.0, 1.0, 4.0, 16.0])
    seeds = tuple(range(args.seeds or (3 if args.full else 1)))
    fig_path, metrics_path = output_paths(args.out, "dpfedavg", args.full)
    t0 = time.time()
    curves = {}
    acc = accuracies(zs, seeds, rounds, curves)
    data = fl.data.load(f"digits:iid,clients={N}", seed=0)
    plain = fedavg(fl.models.logistic(10), setup=setup(None))
    plain_hist = [final_accuracy(plain, data, rounds, s) for s in seeds]
    curves["FedAvg (no DP)"] = plain_hist
    adaptive = privacy.adaptive_clipping(
        fedavg(fl.models.logistic(10), setup=setup(fl.aggregators.dp_mean(1.0, S, delta=DELTA))),
        count_stddev=2.0)
    adapt_hist = [final_accuracy(adaptive, data, rounds, s) for s in seeds]
    curves["adaptive S, z = 1"] = adapt_hist

    numbers = {"fedavg_no_dp_accuracy": float(np.mean([h[-1]["test_accuracy"] for h in plain_hist])),
               "adaptive_z1_accuracy": float(np.mean([h[-1]["test_accuracy"] for h in adapt_hist])),
               "adaptive_z1_final_clip_norm": float(np.mean([h[-1]["clip_norm"] for h in adapt_hist]))}
    print(f"\nDP-FedAvg on digits: {N} clients, {C} per round, S = {S}, {rounds} rounds, "
          f"{len(seeds)} seed(s); epsilon at delta = {DELTA:g}")
    print("| z | test accuracy | epsilon (C of N w/o replacement, RDP) | epsilon (Poisson q = C/N, RDP) |")
    print("|---|---|---|---|")
    eps = {}
    for z in zs:
        e_wor = privacy.Accountant(z, N, C, DELTA).epsilon(rounds)
        e_poi = privacy.Accountant(z, N, C, DELTA, sampling="poisson").epsilon(rounds)
        eps[z] = e_wor
        numbers[f"z={z:g} accuracy"] = acc[z]
        numbers[f"z={z:g} epsilon_without_replacement"] = e_wor
        numbers[f"z={z:g} epsilon_poisson"] = e_poi
        print(f"| {z:g} | {acc[z]:.3f} | {e_wor:.3g} | {e_poi:.3g} |")
    print(f"| FedAvg, no clipping | {numbers['fedavg_no_dp_accuracy']:.3f} | inf | inf |")
    print(f"| adaptive S (z = 1) | {numbers['adaptive_z1_accuracy']:.3f} | "
          f"{eps.get(1.0, float('nan')):.3g} | |")
    print(f"({time.time() - t0:.0f} s)")

    noisy = [z for z in (1.0, 4.0, 16.0) if z in acc]
    passed = (len(noisy) == 3 and acc[1.0] > acc[4.0] > acc[16.0]
              and 0.0 in acc and acc[0.0] - acc[16.0] > 0.3
              and all(eps[a] > eps[b] for a, b in zip(sorted(z for z in zs if z > 0),
                                                      sorted(z for z in zs if z > 0)[1:])))
    _figure(fig_path, curves, eps)
    return finish(CLAIM, numbers, passed, metrics_path,
                  extra=dict(rounds=rounds, seeds=len(seeds), clients=N, clients_per_round=C,
                             clip_norm=S, delta=DELTA))


def _figure(path, curves, eps):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, hists in curves.items():
        rounds = [r["round"] for r in hists[0]]
        acc = np.array([[r["test_accuracy"] for r in h] for h in hists])
        z = float(name.split("=")[1]) if name.startswith("z =") else None
        label = name if z is None or z == 0 else f"{name} (eps = {eps[z]:.3g})"
        style = "--" if not name.startswith("z =") else "-"
        ax.errorbar(rounds, acc.mean(0), yerr=acc.std(0) if len(hists) > 1 else None,
                    linestyle=style, marker="o", label=label, capsize=2)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"DP-FedAvg, digits, {N} clients, {C} per round, S = {S}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"figure: {path}")


if __name__ == "__main__":
    main()
