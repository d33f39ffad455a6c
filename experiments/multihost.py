"""FedAvg/FedProx with the client axis sharded over several processes (multi-controller JAX).

    # two local CPU processes of two devices each, joined over gloo, checked against one process:
    python experiments/multihost.py --processes 2 --devices-per-process 2 --check

    # one process of a real cluster (run the same command on every host, process_id 0 ... P-1):
    python experiments/multihost.py --coordinator host0:1234 --processes 8 --process-id $ID

Every process builds the same data and algorithm, calls `jax.distributed.initialize`, makes
`client_mesh()` over all processes' devices and calls `run(..., mesh=mesh)`; JAX runs the one
SPMD program on every device. Process 0 prints one JSON line: the final metrics, wall time per
round (compile included in the first chunk, so compare `round_ms` of equal settings only) and, with
--check, the largest difference of the final model from a single-process, unsharded run.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

if __package__ in (None, ""):          # `python experiments/multihost.py` from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--devices-per-process", type=int, default=2,
                   help="forced CPU devices per local process (ignored on accelerators)")
    p.add_argument("--coordinator", default=None, help="host:port; omit to launch local processes")
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument("--algorithm", default="fedprox", choices=["fedavg", "fedprox"])
    p.add_argument("--clients-per-round", type=int, default=6)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--eval-every", type=int, default=3)
    p.add_argument("--num-clients", type=int, default=30)
    p.add_argument("--check", action="store_true", help="compare with a one-process run")
    p.add_argument("--out", default=None, help="(internal) where process 0 writes its result")
    return p.parse_args(argv)


def _setup(args):
    from fedjax_lab import Setup, algorithms, models
    from fedjax_lab.data import synthetic
    data = synthetic(1.0, 1.0, num_clients=args.num_clients, seed=0, max_size=200)
    kw = dict(mu=0.1) if args.algorithm == "fedprox" else {}
    setup = Setup.of(client_lr=0.05, clients_per_round=args.clients_per_round, local_steps=10,
                     batch_size=10)
    alg = getattr(algorithms, args.algorithm)(models.logistic(data.num_classes), setup=setup, **kw)
    return alg, data


def worker(args):
    import jax
    import numpy as np
    jax.config.update("jax_cpu_collectives_implementation", "gloo")   # CPU collectives only
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.processes, process_id=args.process_id)
    from fedjax_lab.core.driver import run
    from fedjax_lab.core.sharding import client_mesh
    alg, data = _setup(args)
    mesh = client_mesh()
    t0 = time.perf_counter()
    res = run(alg, data, rounds=args.rounds, key=0, eval_every=args.eval_every, progress=False,
              mesh=mesh)
    seconds = time.perf_counter() - t0
    out = dict(processes=jax.process_count(), devices=jax.device_count(),
               clients_per_round=args.clients_per_round, rounds=args.rounds,
               round_ms=1e3 * seconds / args.rounds, **res.history[-1])
    if args.check:                      # the unsharded reference, on this process's first device
        single = run(alg, data, rounds=args.rounds, key=0, eval_every=args.eval_every,
                     progress=False)
        out["max_abs_diff_vs_one_process"] = max(
            float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
            for a, b in zip(jax.tree.leaves(res.state.params), jax.tree.leaves(single.state.params)))
    jax.distributed.shutdown()
    if args.process_id == 0:
        line = json.dumps(out, sort_keys=True)
        print(line, flush=True)
        if args.out:
            with open(args.out, "w") as f:
                f.write(line + "\n")


def launch_local(args):
    """Start args.processes copies of this script on localhost and wait for them."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices_per_process}")
    base = [sys.executable, os.path.abspath(__file__), "--coordinator", f"127.0.0.1:{port}"]
    base += [a for a in sys.argv[1:]]
    procs = [subprocess.Popen(base + ["--process-id", str(i)], env=env,
                              stderr=None if i == 0 else subprocess.DEVNULL)
             for i in range(args.processes)]
    codes = [p.wait() for p in procs]
    if any(codes):
        sys.exit(f"a process failed: exit codes {codes}")


if __name__ == "__main__":
    a = _args()
    if a.coordinator is None:
        launch_local(a)
    else:
        if a.process_id is None:
            sys.exit("--process-id is required with --coordinator")
        worker(a)
