"""Ditto on 1,000,000 Synthetic(1, 1) clients (logistic 60 -> 10): personal rows on the device vs in
a host ClientStateStore (RAM or np.memmap on disk), with and without prefetching.

    python experiments/bench_store.py                      # 1M clients, all modes
    python experiments/bench_store.py --clients 100000 --rounds 10 --modes store_ram

The data (Synthetic(1,1) generated in chunks of 100k clients with the library's generator, ~8
examples per client) is cached under --cache. Each mode runs in its own process, so its peak
resident memory (ru_maxrss) is its own; other processes on the machine do not count, but they do
share the CPU, so rounds/s are noisy. Prints one table and writes it as JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

MODES = ("device", "store_ram", "store_disk", "store_disk_noprefetch")


def make_data(num_clients: int, cache: str, *, chunk: int = 100_000, seed: int = 0):
    """Synthetic(1, 1) for num_clients clients as flat host arrays, cached as .npy files."""
    path = os.path.join(cache, f"synthetic_{num_clients}")
    names = ("x", "y", "offsets", "tx", "ty", "toffsets")
    if all(os.path.exists(os.path.join(path, f"{n}.npy")) for n in names):
        return path
    from fedjax_lab.data.synthetic import synthetic
    os.makedirs(path, exist_ok=True)
    parts = {n: [] for n in names}
    base, tbase = 0, 0
    for i, lo in enumerate(range(0, num_clients, chunk)):
        n = min(chunk, num_clients - lo)
        d = synthetic(1.0, 1.0, num_clients=n, seed=seed + i, mean_size=1.0, sigma_size=1.0,
                      min_size=4, max_size=30)
        parts["x"].append(np.asarray(d.x))
        parts["y"].append(np.asarray(d.y))
        parts["offsets"].append(np.asarray(d.offsets)[(0 if i == 0 else 1):] + base)
        parts["tx"].append(np.asarray(d.test.x))
        parts["ty"].append(np.asarray(d.test.y))
        parts["toffsets"].append(np.asarray(d.test.offsets)[(0 if i == 0 else 1):] + tbase)
        base += d.num_examples
        tbase += d.test.num_examples
        print(f"  generated clients {lo + n:,}/{num_clients:,}", flush=True)
    for n in names:
        np.save(os.path.join(path, f"{n}.npy"), np.concatenate(parts[n]))
    return path


def load_data(path):
    from fedjax_lab.data.federated import federated_arrays
    ld = lambda n: np.load(os.path.join(path, f"{n}.npy"))
    test = federated_arrays(ld("tx"), ld("ty"), ld("toffsets"), num_classes=10, allow_empty=True,
                            name="test split")
    return federated_arrays(ld("x"), ld("y"), ld("offsets"), test=test, num_classes=10)


def rss_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def child(args):
    import jax
    import jax.numpy as jnp
    from fedjax_lab import Setup, models
    from fedjax_lab.algorithms.ditto import ditto
    from fedjax_lab.core import driver
    from fedjax_lab.core.evaluate import client_sums
    from fedjax_lab.core.store import run_with_store, store_for

    t0 = time.perf_counter()
    data = load_data(args.data)
    data_bytes = sum(int(a.nbytes) for a in jax.tree.leaves(data))
    load_s, rss_data = time.perf_counter() - t0, rss_gib()
    alg = ditto(models.logistic(10), lam=0.1, setup=Setup.of(
        client_lr=0.05, clients_per_round=args.cpr, local_steps=args.steps, batch_size=10))
    key = jax.random.key(0)
    k_init, k_rounds = jax.random.split(key)
    warm, R = args.warmup, args.rounds
    out = dict(mode=args.mode, clients=data.num_clients, examples=data.num_examples,
               data_gib=data_bytes / 2 ** 30, load_s=load_s, rss_after_data_gib=rss_data)
    if args.mode == "device":
        state = alg.init(k_init, data)
        out["rows_gib"] = sum(int(a.nbytes) for a in jax.tree.leaves(state.rows)) / 2 ** 30
        state, _ = driver.run_rounds(alg, state, data, k_rounds, jnp.int32(0), warm)
        jax.block_until_ready(state)
        t = time.perf_counter()
        for c in range(R // warm):
            state, m = driver.run_rounds(alg, state, data, k_rounds, jnp.int32(warm * (c + 1)), warm)
        jax.block_until_ready(state)
        secs = time.perf_counter() - t
        out.update(rounds_per_second=(R // warm) * warm / secs, wait_s=0.0)
        server = state.server
        params = lambda ids: alg.client_params(state, jnp.asarray(ids))
    else:
        path = None if args.mode == "store_ram" else os.path.join(args.cache, "rows")
        server, store = store_for(alg, k_init, data, path=path)
        out["rows_gib"] = store.nbytes / 2 ** 30
        first = run_with_store(alg, data, store, rounds=warm, key=key, server=server)
        res = run_with_store(alg, data, store, rounds=R, key=key, server=first.server,
                             first_round=warm, prefetch=args.mode != "store_disk_noprefetch")
        out.update(rounds_per_second=res.rounds_per_second, wait_s=res.wait_seconds)
        server = res.server
        params = lambda ids: store.gather(ids)
    # the O(N log N) uniform sampling (shared core/sampling.py) alone, per round
    sample = jax.jit(lambda d, r: alg.rows_round.sample(d, jax.random.fold_in(k_rounds, r)))
    jax.block_until_ready(sample(data, jnp.int32(1)))
    t = time.perf_counter()
    for r in range(3):
        jax.block_until_ready(sample(data, jnp.int32(r + 2)))
    out["sample_s_per_round"] = (time.perf_counter() - t) / 3
    # personalized vs global test accuracy of the last round's participants
    last = np.asarray(alg.rows_round.sample(data, jax.random.fold_in(k_rounds, warm + R)))
    ev = jax.jit(lambda p, sp, ids: client_sums(alg.model, p, sp, ids))
    _, cp, n = ev(jax.tree.map(jnp.asarray, params(last)), data.test, jnp.asarray(last))
    glob = jax.tree.map(lambda x: jnp.broadcast_to(x, (last.shape[0],) + x.shape), server.params)
    _, cg, _ = ev(glob, data.test, jnp.asarray(last))
    out.update(personal_acc=float(cp.sum() / n.sum()), global_acc=float(cg.sum() / n.sum()),
               peak_rss_gib=rss_gib())
    print("RESULT " + json.dumps(out), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--clients", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--cpr", type=int, default=1000, help="clients per round")
    ap.add_argument("--steps", type=int, default=10, help="local steps (batch 10)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--cache", default="/tmp/fedjax_bench")
    ap.add_argument("--out", default="runs/bench_store.json")
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        return child(args)
    if args.rounds % args.warmup:
        ap.error("--rounds must be a multiple of --warmup (the device mode scans warmup rounds)")
    t = time.perf_counter()
    path = make_data(args.clients, args.cache)
    print(f"data ready in {time.perf_counter() - t:.0f} s: {path}", flush=True)
    rows = []
    for mode in args.modes.split(","):
        cmd = [sys.executable, __file__, "--mode", mode, "--data", path] + sys.argv[1:]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not got:
            print(f"{mode}: failed\n{proc.stderr[-3000:]}")
            continue
        rows.append(json.loads(got[-1][7:]))
        r = rows[-1]
        print(f"{mode:>22}: {r['rounds_per_second']:6.2f} rounds/s  gather wait {r['wait_s']:5.2f} s  "
              f"rows {r['rows_gib']:.2f} GiB  data {r['data_gib']:.2f} GiB  peak RSS "
              f"{r['peak_rss_gib']:.2f} GiB  acc personal {r['personal_acc']:.3f} / global "
              f"{r['global_acc']:.3f}  (sampling alone {r['sample_s_per_round']:.2f} s/round)", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
