"""Benchmark: count-sketching client updates, alone and as a share of a FetchSGD round.

Part 1: sketch C client updates of a d-parameter vector (default 1,000 x 1M, r = 5, c = 50k) in
one jitted call (batched scatter-adds over vmapped chunks of `--chunk` clients to bound memory),
and one d-vector for comparison. By default client c's update is scale_c * base, formed inside the
call chunk by chunk (the 4 GB [C, d] input is never held); `--materialize` sketches a [C, d] array
with `compression.sketch_clients` instead.

Part 2: one FetchSGD round of the FedAvg MNIST CNN (1,663,370 parameters) on MNIST-shaped random
data, `--round-clients` clients per round: the whole jitted round, its local-training part alone
and its sketching part alone, for per-client sketching (what clients send) and for sketching the
weighted sum once (identical by linearity). Prints times (median of `--repeats`) and the shares.

Measured on our 2-core CPU (other jobs running, load average ~9; CPU seconds are the steadier
figure): [1] 1,000 x 1M, r=5, c=50k in one call: 30.3 s wall, 20.6 CPU s (~4 ns per scatter-add
of CPU, 30 ms per client); one 1M vector 52 ms (45 ms CPU): batching gains 1.7x (wall) over a loop.
[2] CNN, 20 clients x 1 step x batch 10 (1 step is the least local work there is): round 5.2 s;
per-client sketching 1.13 s = 21.9% of the round (21.5% of CPU): just above the 20% goal; the
server-side sketch of the weighted sum (identical by linearity): 2.6%.

    python experiments/bench_sketch.py                       # the full sizes (~minutes, ~6 GB)
    python experiments/bench_sketch.py --clients 100 --round-clients 20 --repeats 2   # quick
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab import Setup, models
from fedjax_lab import compression as cz
from fedjax_lab.algorithms.fetchsgd import client_gradients, fetchsgd
from fedjax_lab.core.rounds import participate
from fedjax_lab.core.tree import flatten
from fedjax_lab.data import federated_arrays


CPU_TIMES = {}


def timeit(fn, *args, repeats, label=None):
    """Median wall seconds; the median process CPU seconds go to CPU_TIMES[label] (on a shared,
    loaded machine CPU time is the steadier measure of the work; wall time is what a user sees)."""
    jax.block_until_ready(fn(*args))                       # compile + warm up
    times, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    if label is not None:
        CPU_TIMES[label] = float(np.median(cpu))
    return float(np.median(times))


def part1(args):
    cs = cz.count_sketch(jax.random.key(0), args.dim, rows=args.rows, cols=args.cols)
    base = jax.random.normal(jax.random.key(1), (args.dim,))
    scale = jax.random.normal(jax.random.key(2), (args.clients,))
    if args.materialize:                       # [C, d] float32 in memory (4 GB at 1,000 x 1M)
        vs = scale[:, None] * base[None, :]
        batched = jax.jit(lambda cs, vs: cz.sketch_clients(cs, vs, chunk=args.chunk))
        inputs = (cs, vs)
    else:                                      # client c's update is scale_c * base, formed inside
        batched = jax.jit(lambda cs, scale, base: jax.lax.map(   # the call chunk by chunk
            lambda s: cz.sketch(cs, s[:, None] * base[None, :]),
            scale.reshape(-1, args.chunk)).reshape(-1, cs.rows, cs.cols))
        inputs = (cs, scale, base)
    one = jax.jit(cz.sketch)
    t_all = timeit(batched, *inputs, repeats=args.repeats, label="all")
    t_one = timeit(one, cs, base, repeats=args.repeats, label="one")
    cells = args.clients * args.dim * args.rows
    print(f"[1] sketch {args.clients} x {args.dim:,} (r={args.rows}, c={args.cols:,}) in one call: "
          f"{t_all:.2f} s  ({t_all / cells * 1e9:.2f} ns per scatter-add; "
          f"{t_all / args.clients * 1e3:.1f} ms per client); CPU time {CPU_TIMES['all']:.2f} s")
    print(f"    one {args.dim:,}-vector: {t_one * 1e3:.1f} ms (CPU {CPU_TIMES['one'] * 1e3:.1f} ms)"
          f" -> batching gain over a loop of single calls {t_one * args.clients / t_all:.2f}x "
          f"(wall), {CPU_TIMES['one'] * args.clients / CPU_TIMES['all']:.2f}x (CPU)")
    print(f"    table {cs.num_bytes:,} B vs dense {4 * args.dim:,} B: compression "
          f"{4 * args.dim / cs.num_bytes:.1f}x")


def part2(args):
    model = models.cnn(10)
    n = args.round_clients * args.batch_size * 2
    rng = np.random.default_rng(0)
    x = rng.random((n, 28, 28, 1), np.float32)
    y = rng.integers(0, 10, n)
    data = federated_arrays(x, y, np.arange(args.round_clients + 1) * (n // args.round_clients),
                            num_classes=10)
    setup = Setup.of(clients_per_round=args.round_clients, batch_size=args.batch_size,
                     local_steps=args.local_steps, server_lr=0.1)
    kw = dict(k=args.k, sketch_rows=args.rows, sketch_cols=args.cols, setup=setup)
    alg = fetchsgd(model, **kw)
    s = alg.setup                              # uniform weights, client lr 1 (FetchSGD's defaults)
    state = alg.init(jax.random.key(0), data)
    d = flatten(state.params)[0].shape[0]
    key = jax.random.key(1)

    def local_only(state, data, key):
        k_part, k_train = jax.random.split(key)
        part = participate(k_part, data, s.cohort, s.work)
        return client_gradients(model, s.client_opt, state.params, data, part, k_train)[0]

    g = jax.jit(local_only)(state, data, key)
    t_local = timeit(jax.jit(local_only), state, data, key, repeats=args.repeats, label="local")
    p = jnp.full((g.shape[0],), 1.0 / g.shape[0])          # the server's weights, as in the round
    t_sk_clients = timeit(jax.jit(lambda cs, g: jnp.tensordot(
        p, cz.sketch_clients(cs, g, chunk=args.chunk), axes=1)), state.sketch, g,
        repeats=args.repeats, label="sk_clients")
    t_sk_sum = timeit(jax.jit(lambda cs, g: cz.sketch(cs, p @ g)), state.sketch, g,
                      repeats=args.repeats, label="sk_sum")
    print(f"[2] FetchSGD round, CNN d={d:,}, {args.round_clients} clients x {args.local_steps} "
          f"local step(s) x batch {args.batch_size}, sketch {args.rows} x {args.cols:,}, "
          f"k={args.k:,}")
    print(f"    local training alone: {t_local:.3f} s (CPU {CPU_TIMES['local']:.3f} s)")
    for per_client, t_sk in ((True, t_sk_clients), (False, t_sk_sum)):
        alg = fetchsgd(model, per_client_sketch=per_client, **kw)
        t_round = timeit(jax.jit(alg.round), state, data, key, repeats=args.repeats,
                         label=f"round{per_client}")
        label = "per-client sketches" if per_client else "sketch of the sum "
        cpu_sk = CPU_TIMES["sk_clients" if per_client else "sk_sum"]
        cpu_round = CPU_TIMES[f"round{per_client}"]
        print(f"    {label}: round {t_round:.3f} s (CPU {cpu_round:.3f} s), sketching "
              f"{t_sk:.3f} s (CPU {cpu_sk:.3f} s) = {100 * t_sk / t_round:.1f}% of the round by "
              f"wall time, {100 * cpu_sk / cpu_round:.1f}% by CPU time (goal < 20%)")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--dim", type=int, default=1_000_000)
    p.add_argument("--rows", type=int, default=5)
    p.add_argument("--cols", type=int, default=50_000)
    p.add_argument("--chunk", type=int, default=50, help="clients per vmapped chunk")
    p.add_argument("--materialize", action="store_true",
                   help="hold all C x d client updates in memory (default: form each chunk's "
                        "updates inside the call, so 1,000 x 1M fits beside other jobs)")
    p.add_argument("--round-clients", type=int, default=100)
    p.add_argument("--local-steps", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--k", type=int, default=50_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip", choices=["1", "2"], default=None, help="skip part 1 or 2")
    args = p.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {jax.device_count()} device(s)")
    if args.skip != "1":
        part1(args)
    if args.skip != "2":
        part2(args)


if __name__ == "__main__":
    main()
