"""Sweep vs the loop it replaces (issue 28): `fl.sweep` of R runs against the same R runs one after
another (`fl.run`), side by side in one process, per run, for R in 1, 4, 12, 48 on three workloads.

    python experiments/sweep_vs_runs.py                          # all workloads, R = 1 4 12 48
    python experiments/sweep_vs_runs.py --workloads logistic --runs 12 --repeats 9
    python experiments/sweep_vs_runs.py --device gpu             # + FedAvg round and CNN round
    python experiments/sweep_vs_runs.py --cpu-devices 2          # the sweep on both CPU cores

The runs are FedProx (mu in {0, 0.01, 0.1, 1}, the first min(R, 4) of them) x R / 4 seeds:
* logistic: models.logistic(10) on Synthetic(1,1), 30 clients (power-law sizes 45..800), 10 per
  round, 20 local steps of batch 10, stragglers 0.5, evaluation every 10 rounds (the FedProx
  demo's setting and issue 28's measurement: 10 and 60 rounds).
* mlp: models.mlp(10) (784-200-200-10) on MNIST-shaped Gaussian data (bench_round.make_data),
  20 clients x 100 examples, 4 per round, 10 steps of batch 32; 2 and 6 rounds, evaluation every 2.
* cnn: models.cnn(10) (1.66 M parameters) on 28x28x1 inputs, 10 clients x 50 examples, 2 per round,
  2 steps of batch 10; 1 and 2 rounds, evaluation every round.

Timing. Execution per run and round is (T(r2 rounds) - T(r1 rounds)) / (r2 - r1) / R of the whole
`fl.sweep` call and of the R `fl.run` calls, warm (nothing to compile), so that compilation and
the per-call fixed costs cancel, as in issue 28; "end to end" is the ratio of the warm r2-round
calls, fixed costs included; "CPU-time ratio" the same differences in process CPU time
(`time.process_time`, all threads), less sensitive to other processes' load than wall time.
Each side is first called once cold, and compilation is reported
apart as cold minus warm (the sweep: one program per R; the runs: one program per mu value, shared
by all R of a workload, so 0 once compiled). The sides alternate within every repeat, and which
goes first alternates too, so that the machine's load hits both alike; medians over repeats (at
least 3, up to --repeats, fewer once a row has taken --max-seconds). Both sides compute the same
numbers: the script checks every run's final train loss against its sweep row. `--memory-budget`
(bytes) is passed to the sweep, which then chunks the runs from XLA's memory analysis.

`--cpu-devices D` gives jax D CPU devices (set before jax starts) and the sweep spreads its runs
over them (fl.sweep's `devices`, one per core). The sequential side is then the faster of two
contenders, both measured in every repeat: `fl.run` on one device, and `fl.run(mesh=client_mesh())`,
its clients split over the D devices; the table's sequential column is the faster one's median.

`--device gpu` runs everything on the GPU (JAX_PLATFORMS=cuda, set before jax is imported) and then,
in the same command, the FedAvg round benchmark (bench_round.py, logistic C=1000 and MLP C=100) and
the CNN round (bench_cnn.py round 8 100), so that one short GPU session gives the whole table.
Writes `<out>/sweep_vs_runs.json` (`sweep_vs_runs_cpuD.json` with D CPU devices; and prints a markdown table).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

MUS = [0.0, 0.01, 0.1, 1.0]
WORKLOADS = ("logistic", "mlp", "cnn")


def workload(name: str):
    """(model factory, data, setup, (r1, r2) rounds, eval_every) of a workload (module doc)."""
    from fedjax_lab import Setup, models
    from fedjax_lab.data import synthetic
    from experiments.bench_round import make_data
    if name == "logistic":
        return (lambda: models.logistic(10), synthetic(1.0, 1.0, num_clients=30, seed=0),
                Setup.of(clients_per_round=10, local_steps=20, batch_size=10, client_lr=0.01,
                         stragglers=0.5), (10, 60), 10)
    if name == "mlp":
        return (lambda: models.mlp(10), make_data("mlp", 20, 100, (784,)),
                Setup.of(clients_per_round=4, local_steps=10, batch_size=32, client_lr=0.01,
                         stragglers=0.5), (2, 6), 2)
    if name == "cnn":
        return (lambda: models.cnn(10), make_data("cnn", 10, 50, (28, 28, 1)),
                Setup.of(clients_per_round=2, local_steps=2, batch_size=10, client_lr=0.01,
                         stragglers=0.5), (1, 2), 1)
    raise ValueError(f"unknown workload {name!r}; choose from {WORKLOADS}")


def grid_of(R: int):
    """(mu values, seeds) of R runs: the first min(R, 4) mu values x R / that many seeds."""
    mus = MUS[:min(R, len(MUS))]
    if R % len(mus):
        raise ValueError(f"runs must be 1, 2, 3 or a multiple of 4, got {R}")
    return mus, list(range(R // len(mus)))


def measure(name: str, R: int, repeats: int, memory_budget=None, max_seconds=240.0,
            cache={}) -> dict:
    """One row of the table: per run and round, the warm execution of both sides (medians over
    repeats of T(r2 rounds) - T(r1 rounds)), compile times, and the check of equal numbers."""
    import jax
    import numpy as np
    import fedjax_lab as fl
    from fedjax_lab import algorithms
    from fedjax_lab.core import sharding

    if name not in cache:                    # one model per workload: fl.run's programs are
        make_model, data, setup, lengths, every = workload(name)     # compiled once per mu value
        cache[name] = (make_model(), data, setup, lengths, every, {})
    model, data, setup, (r1, r2), every, algs = cache[name]
    mus, seeds = grid_of(R)
    new_programs = [mu for mu in mus if mu not in algs]
    for mu in new_programs:
        algs[mu] = algorithms.fedprox(model, mu=mu, setup=setup)

    def runs(rounds, mesh=None):             # mesh: the clients split over the devices
        t, c = time.perf_counter(), time.process_time()
        loss = []
        for mu in mus:
            for s in seeds:
                res = fl.run(algs[mu], data, rounds=rounds, key=s, eval_every=every,
                             progress=False, mesh=mesh)
                loss.append(res.history[-1]["train_loss"])
        jax.block_until_ready(jax.tree.leaves(res.state))
        return (time.perf_counter() - t, time.process_time() - c), loss

    mesh = sharding.client_mesh() if jax.device_count() > 1 else None
    runs_mesh = functools.partial(runs, mesh=mesh)

    def swept(rounds):
        t, c = time.perf_counter(), time.process_time()
        res = fl.sweep(algorithms.fedprox, data, model=model, setup=setup, grid={"mu": mus},
                       seeds=seeds, rounds=rounds, eval_every=every, progress=False,
                       memory_budget=memory_budget)
        jax.block_until_ready(jax.tree.leaves(res.runs[-1].state))
        return ((time.perf_counter() - t, time.process_time() - c),
                [r.history[-1]["train_loss"] for r in res.runs], res)

    (cold_runs, _), loss_r = runs(r1)
    (cold_sweep, _), loss_s, res = swept(r1)
    sides = ("sweep", "runs") + (("runs_mesh",) if mesh is not None else ())
    if mesh is not None:
        runs_mesh(r1)
    times = {f"{side}_{r}": [] for side in sides for r in ("r1", "r2")}
    cpu = {k: [] for k in times}
    start = time.perf_counter()
    for rep in range(repeats):               # alternate the order of the sides
        calls = [("sweep", swept), ("runs", runs)] + ([("runs_mesh", runs_mesh)] if mesh else [])
        for side, fn in (calls if rep % 2 == 0 else calls[::-1]):
            for r, length in (("r1", r1), ("r2", r2)):
                wall, used = fn(length)[0]
                times[f"{side}_{r}"].append(wall)
                cpu[f"{side}_{r}"].append(used)
        if rep >= 2 and time.perf_counter() - start > max_seconds:
            break
    med = lambda xs: float(statistics.median(xs))
    diff = lambda d, side: med([b - a for a, b in zip(d[f"{side}_r1"], d[f"{side}_r2"])])
    per_round = {side: diff(times, side) / (r2 - r1) / R for side in sides}
    seq = min(("runs",) + (("runs_mesh",) if mesh is not None else ()), key=per_round.get)
    return dict(workload=name, runs=R, rounds=(r1, r2), eval_every=every,
                devices=jax.device_count(), sequential=seq,
                runs_one_device_ms=1e3 * per_round["runs"],
                runs_clients_sharded_ms=1e3 * per_round.get("runs_mesh", float("nan")),
                repeats=len(times["runs_r1"]), runs_per_chunk=res.runs_per_chunk,
                runs_as_map=_runs_as_map(model, data, setup),
                sweep_ms=1e3 * per_round["sweep"], runs_ms=1e3 * per_round[seq],
                ratio=per_round[seq] / per_round["sweep"],
                cpu_ratio=diff(cpu, seq) / diff(cpu, "sweep"),
                e2e_ratio=med(times[f"{seq}_r2"]) / med(times["sweep_r2"]),
                compile_sweep_s=cold_sweep - med(times["sweep_r1"]),
                compile_runs_s=cold_runs - med(times["runs_r1"]),
                new_run_programs=len(new_programs),
                max_rel_loss_diff=float(np.max(np.abs(np.array(loss_r) - np.array(loss_s))
                                               / np.abs(np.array(loss_r)))),
                times_s=times, cpu_s=cpu, load_avg_1min=round(os.getloadavg()[0], 2))


def _runs_as_map(model, data, setup) -> bool:
    """Whether fl.sweep maps this workload's runs (clients as a lax.map: large models on CPU)."""
    from fedjax_lab import algorithms
    from fedjax_lab.core import sweep as sw
    program = sw.Program(factory=algorithms.fedprox, model=model, static=(), traced=("mu",),
                         kinds=(("mu", "factory"),), setup=setup)
    return sw.clients_mapped(program, {"mu": 0.1}, data)


def table(rows) -> str:
    out = ["| workload | devices | runs | sweep ms / run / round | sequential ms / run / round | ratio | "
           "CPU-time ratio | end to end | compile: sweep / runs (new programs) | repeats | "
           "max rel. loss diff |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for x in rows:
        mapped = " (runs mapped)" if x["runs_as_map"] and x["runs"] > 1 else ""
        seq = " (clients sharded)" if x["sequential"] == "runs_mesh" else ""
        out.append(f"| {x['workload']}{mapped} | {x['devices']} | "
                   f"{x['runs']} | {x['sweep_ms']:.2f} | {x['runs_ms']:.2f}{seq} | "
                   f"**{x['ratio']:.2f}x** | {x['cpu_ratio']:.2f}x | {x['e2e_ratio']:.2f}x | "
                   f"{x['compile_sweep_s']:.1f} s /"
                   f" {x['compile_runs_s']:.1f} s ({x['new_run_programs']}) | {x['repeats']} | "
                   f"{x['max_rel_loss_diff']:.0e} |")
    return "\n".join(out)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workloads", nargs="*", default=list(WORKLOADS), choices=WORKLOADS)
    p.add_argument("--runs", nargs="*", type=int, default=[1, 4, 12, 48])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--memory-budget", type=float, default=None, help="bytes, passed to fl.sweep")
    p.add_argument("--max-seconds", type=float, default=240.0,
                   help="stop repeating a row after 3 repeats once it has taken this long")
    p.add_argument("--device", choices=["cpu", "gpu"], default=None,
                   help="gpu: JAX_PLATFORMS=cuda, plus the FedAvg and CNN round benchmarks")
    p.add_argument("--cpu-devices", type=int, default=1,
                   help="jax CPU devices (the sweep spreads its runs over them; module doc)")
    p.add_argument("--out", default="experiments/figures")
    args = p.parse_args(argv)
    if args.device is not None:              # before jax is imported anywhere in this process
        os.environ["JAX_PLATFORMS"] = {"cpu": "cpu", "gpu": "cuda"}[args.device]
    import jax
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)   # before jax's backends start
    env = dict(backend=jax.default_backend(), device=jax.devices()[0].device_kind,
               devices=jax.device_count(),
               cpus=os.cpu_count(), load_avg_1min=round(os.getloadavg()[0], 2))
    print(json.dumps(env), flush=True)
    rows = []
    for name in args.workloads:
        for R in args.runs:
            rows.append(measure(name, R, args.repeats, args.memory_budget, args.max_seconds))
            print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("times_s", "cpu_s")}),
                  flush=True)
    print(f"\nFedProx sweeps on {env['backend']} ({env['device']}), per run and round: medians "
          "over warm repeats of T(r2) - T(r1), sides alternating:\n" + table(rows), flush=True)
    os.makedirs(args.out, exist_ok=True)
    suffix = f"_cpu{args.cpu_devices}" if args.cpu_devices > 1 else ""
    with open(os.path.join(args.out, f"sweep_vs_runs{suffix}.json"), "w") as f:
        json.dump(dict(env=env, rows=rows), f, indent=2)
    if args.device == "gpu":                 # the rest of the GPU table, in the same command
        here = os.path.dirname(os.path.abspath(__file__))
        for cmd in (["bench_round.py", "--only", "logistic:1000", "mlp:100"],
                    ["bench_cnn.py", "round", "8", "100"]):
            subprocess.run([sys.executable, os.path.join(here, cmd[0])] + cmd[1:], check=False,
                           env=dict(os.environ))
    return dict(env=env, rows=rows)


if __name__ == "__main__":
    main()
