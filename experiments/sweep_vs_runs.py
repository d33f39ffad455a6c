"""Wall time of one 12-run sweep (4 values of FedProx's mu x 3 seeds, `fl.sweep`) against the same
12 runs one after another (`fl.run`), side by side in one process, medians over repeats.

    python experiments/sweep_vs_runs.py            # CPU size: Synthetic(1,1), 30 clients, 20 rounds
    python experiments/sweep_vs_runs.py --full     # 200 rounds (the FedProx demo's length)

Two numbers per side: "cold" includes compilation (a new model object each repeat, so neither side
finds a compiled program: 12 compilations for the runs, one for the sweep) and "warm" reruns the
same algorithms (nothing compiles; pure execution). Both sides compute the same numbers: the script
checks every run's final test accuracy against its sweep row.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

MUS = [0.0, 0.01, 0.1, 1.0]


def main(argv=None) -> dict:
    import jax
    import fedjax_lab as fl
    from fedjax_lab import Setup, algorithms, models
    from fedjax_lab.data import synthetic

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--full", action="store_true")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default="experiments/figures")
    args = p.parse_args(argv)
    rounds = args.rounds or (200 if args.full else 20)
    seeds = [int(s) for s in args.seeds.split(",")]
    data = synthetic(1.0, 1.0, num_clients=30, seed=0)
    setup = Setup.of(clients_per_round=10, local_steps=20, batch_size=10, client_lr=0.01,
                     stragglers=0.5)
    eval_every = 10

    def runs(model, algs=None):
        algs = algs or {mu: algorithms.fedprox(model, mu=mu, setup=setup) for mu in MUS}
        t = time.perf_counter()
        acc = [fl.run(algs[mu], data, rounds=rounds, key=s, eval_every=eval_every,
                      progress=False).history[-1]["test_accuracy"] for mu in MUS for s in seeds]
        return time.perf_counter() - t, acc, algs

    def swept(model):
        t = time.perf_counter()
        res = fl.sweep(algorithms.fedprox, data, model=model, setup=setup, grid={"mu": MUS},
                       seeds=seeds, rounds=rounds, eval_every=eval_every, progress=False)
        jax.block_until_ready(jax.tree.leaves(res.runs[-1].state))
        return time.perf_counter() - t, [r.history[-1]["test_accuracy"] for r in res.runs]

    times = {k: [] for k in ("runs_cold", "sweep_cold", "runs_warm", "sweep_warm")}
    worst = 0.0
    for rep in range(args.repeats):          # alternate the two sides
        model = models.logistic(10)          # a new model: nothing compiled yet for either side
        t, acc_r, algs = runs(model)
        times["runs_cold"].append(t)
        t, acc_s = swept(model)
        times["sweep_cold"].append(t)
        times["runs_warm"].append(runs(model, algs)[0])
        times["sweep_warm"].append(swept(model)[0])
        worst = max(worst, float(np.max(np.abs(np.array(acc_r) - np.array(acc_s)))))
        print(f"repeat {rep}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()),
              flush=True)
    med = {k: float(np.median(v)) for k, v in times.items()}
    numbers = dict(med, ratio_cold=med["runs_cold"] / med["sweep_cold"],
                   ratio_warm=med["runs_warm"] / med["sweep_warm"], max_abs_accuracy_diff=worst,
                   rounds=rounds, runs=len(MUS) * len(seeds), devices=str(jax.devices()[0]))
    print(f"\n{len(MUS) * len(seeds)} runs of FedProx (mu in {MUS}, seeds {seeds}), {rounds} "
          f"rounds, Synthetic(1,1) 30 clients, on {jax.devices()[0].platform}; medians of "
          f"{args.repeats}")
    print("| | 12 x fl.run | fl.sweep | ratio |\n|---|---:|---:|---:|")
    print(f"| cold (with compilation) | {med['runs_cold']:.2f} s | {med['sweep_cold']:.2f} s | "
          f"{numbers['ratio_cold']:.1f}x |")
    print(f"| warm (execution only) | {med['runs_warm']:.2f} s | {med['sweep_warm']:.2f} s | "
          f"{numbers['ratio_warm']:.1f}x |")
    print(f"max |test accuracy difference| between the two sides: {worst:.2e}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sweep_vs_runs.json"), "w") as f:
        json.dump(numbers, f, indent=2)
    return numbers


if __name__ == "__main__":
    main()
