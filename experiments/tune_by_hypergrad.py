"""Tune the server learning rate of FedAvg by gradient descent through training (`fl.hypergrad`)
against the best point of a grid sweep (`fl.sweep`) of the same budget; and how the
hypergradient's memory and time grow with the number of rounds R.

    python experiments/tune_by_hypergrad.py              # digits, 20 clients (Dirichlet 0.5), R = 20
    python experiments/tune_by_hypergrad.py --full       # R = 50, budget 8
    python experiments/tune_by_hypergrad.py --memory     # also: temp bytes and seconds vs R

Protocol. Each client's train split is cut 80/20 into train and validation
(`core.meta.split_support_query`). Both methods see the validation loss after R rounds only:
  * grid: `budget` server learning rates log-spaced over [0.1, 10], one sweep (every point x
    every seed), pick the lowest mean validation loss;
  * hypergradient: `budget` steps of gradient descent on theta = log(server_lr) from
    server_lr = 1 (FedAvg's default): theta <- theta - 2 s dL_val/ds / L_val (the mean over
    seeds), clipped to |delta theta| <= 0.5, with backtracking (a step that raises the loss is
    undone and halved).
The budget counts R-round trainings; one hypergradient step is one training plus its backward
pass (about 3x its time, measured below). Each method's choice is then trained once on the train
split and scored on the held-out test split.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

CLAIM = ("Gradient descent on log(server_lr) through R rounds of FedAvg (fl.hypergrad) reaches a "
         "validation loss within 2% of (or below) the best point of a same-budget grid sweep.")


def main(argv=None) -> dict:
    import fedjax_lab as fl
    from fedjax_lab import Setup, algorithms, models
    from fedjax_lab.core.hypergrad import memory_bytes
    from fedjax_lab.core.meta import split_support_query
    from fedjax_lab.data import realdata

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--full", action="store_true")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--out", default="experiments/reproduce/figures")
    p.add_argument("--memory", action="store_true", help="measure memory and time vs R")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    rounds, budget = (50, 8) if args.full else (20, 6)
    data = realdata.digits(num_clients=20, partition="dirichlet=0.5", seed=0)
    train, val = split_support_query(data, support_fraction=0.8, seed=0)
    tune = train.replace(test=val)          # test_* of these runs = validation numbers
    final = train.replace(test=data.test)
    model = models.mlp(10, hidden=(32,))
    setup = Setup.of(clients_per_round=10, local_steps=10, batch_size=16, client_lr=0.05)
    fac = algorithms.fedavg

    # grid sweep
    t = time.perf_counter()
    grid = [float(x) for x in np.geomspace(0.1, 10.0, budget)]
    res = fl.sweep(fac, tune, model=model, setup=setup, grid={"server_lr": grid}, seeds=seeds,
                   rounds=rounds, eval_every=rounds, progress=False)
    _, points = res.summary(["test_loss"])
    grid_val = [pt["final_test_loss_mean"] for pt in points]
    grid_time = time.perf_counter() - t
    best = int(np.nanargmin(grid_val))
    # hypergradient descent
    t = time.perf_counter()
    theta, path, best_theta, best_value, step = 0.0, [], 0.0, float("inf"), 0.0
    for _ in range(budget):
        s = float(np.exp(theta))
        hs = [fl.hypergrad(fac, tune, model=model, wrt={"server_lr": s}, rounds=rounds, key=k,
                           setup=setup) for k in seeds]
        value = float(np.mean([h.value for h in hs]))
        g = float(np.mean([h.grads["server_lr"] for h in hs])) * s      # dL / d theta
        path.append((s, value, g))
        if value < best_value:       # accept: a gradient step from here
            best_theta, best_value = theta, value
            step = float(np.clip(-2.0 * g / max(abs(value), 1e-3), -0.5, 0.5))
        else:                        # the loss went up: back to the best point, half the step
            step /= 2
        theta = best_theta + step
    hg_time = time.perf_counter() - t
    s_hg = min(path, key=lambda r: r[1])[0]
    hg_val = min(r[1] for r in path)

    def test_of(server_lr):
        alg = fac(model, setup=Setup.of(**dict(setup.overrides), server_lr=server_lr))
        hist = [fl.run(alg, final, rounds=rounds, key=k, eval_every=rounds,
                       progress=False).history[-1] for k in seeds]
        return (float(np.mean([h["test_loss"] for h in hist])),
                float(np.mean([h["test_accuracy"] for h in hist])))

    grid_test, hg_test = test_of(grid[best]), test_of(s_hg)
    numbers = dict(rounds=rounds, budget=budget, grid_best_server_lr=grid[best],
                   grid_best_val_loss=grid_val[best], grid_time_s=grid_time,
                   hypergrad_server_lr=s_hg, hypergrad_val_loss=hg_val, hypergrad_time_s=hg_time,
                   grid_test_loss=grid_test[0], grid_test_accuracy=grid_test[1],
                   hypergrad_test_loss=hg_test[0], hypergrad_test_accuracy=hg_test[1])
    print(f"FedAvg on digits (20 clients, Dirichlet 0.5), R = {rounds}, budget {budget} "
          f"trainings, seeds {seeds}")
    print("grid:       " + ", ".join(f"{s:.3g}: {v:.4f}" for s, v in zip(grid, grid_val)))
    print("hypergrad:  " + ", ".join(f"{s:.3g}: {v:.4f} (dL/dlog s {g:+.3f})" for s, v, g in path))
    print("| method | server lr | val loss | test loss | test acc | time |\n|---|---:|---:|---:|---:|---:|")
    print(f"| grid best | {grid[best]:.3g} | {grid_val[best]:.4f} | {grid_test[0]:.4f} | "
          f"{grid_test[1]:.4f} | {grid_time:.1f} s |")
    print(f"| hypergradient | {s_hg:.3g} | {hg_val:.4f} | {hg_test[0]:.4f} | {hg_test[1]:.4f} | "
          f"{hg_time:.1f} s |")

    if args.memory:
        mem = {}
        for R in (5, 10, 20, 40):
            for remat in ("none", "round", max(1, int(round(np.sqrt(R))))):
                b = memory_bytes(fac, tune, model=model, wrt={"server_lr": 1.0}, rounds=R,
                                 setup=setup, remat=remat)
                fl.hypergrad(fac, tune, model=model, wrt={"server_lr": 1.0}, rounds=R, key=0,
                             setup=setup, remat=remat)          # compile
                t = time.perf_counter()
                fl.hypergrad(fac, tune, model=model, wrt={"server_lr": 1.0}, rounds=R, key=1,
                             setup=setup, remat=remat)
                sec = time.perf_counter() - t
                name = remat if isinstance(remat, str) else "sqrt"
                mem[f"{name}_R{R}"] = (b, sec)
                print(f"R={R:3d} remat={str(remat):6s} temp {b / 1e6:8.2f} MB  {sec:.2f} s",
                      flush=True)
            alg = fac(model, setup=setup)
            fl.run(alg, tune, rounds=R, key=0, eval_every=R, progress=False)
            t = time.perf_counter()
            fl.run(alg, tune, rounds=R, key=1, eval_every=R, progress=False)
            mem[f"forward_R{R}"] = (0, time.perf_counter() - t)
            print(f"R={R:3d} forward only (fl.run)        {mem[f'forward_R{R}'][1]:.2f} s")
        numbers["memory"] = mem

    passed = bool(hg_val <= grid_val[best] * 1.02)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tune_by_hypergrad.json"), "w") as f:
        json.dump(numbers, f, indent=2)
    _figure(grid, grid_val, path, os.path.join(args.out, "tune_by_hypergrad.png"))
    print(f"claim: {CLAIM}\npassed: {passed}")
    return {"claim": CLAIM, "passed": passed,
            "numbers": {k: v for k, v in numbers.items() if isinstance(v, (int, float))}}


def _figure(grid, grid_val, path, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(grid, grid_val, "o-", label="grid sweep")
    ax.plot([r[0] for r in path], [r[1] for r in path], "x--", label="hypergradient steps")
    for i, (s, v, _) in enumerate(path):
        ax.annotate(str(i), (s, v), fontsize=7)
    ax.set_xscale("log"), ax.set_xlabel("server lr"), ax.set_ylabel("validation loss after R")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
