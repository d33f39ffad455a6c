"""CNN benchmark (issue 12): FedAvg's MNIST CNN on CPU, our round against FedJAX's way and a loop.

    python experiments/bench_cnn.py client          # one client's 10 steps, every formulation
    python experiments/bench_cnn.py round 8 100     # the round at C = 8 and C = 100
    python experiments/bench_cnn.py memory 10 100 1000 --chunk 0 10   # peak memory vs C

The model is `models.cnn(10)` (1,663,370 parameters) on 28x28x1 Gaussian inputs labelled by a
random linear teacher (bench_round.make_data); 10 local steps of batch 10, 50 examples per client,
SGD lr 0.01. Every line is one run, contenders interleaved (bench_round.interleaved), after a
warm-up, `block_until_ready`, medians over `--reps`.

Contenders, each the best version of itself we could write:
* round: `jax.jit(fedavg(...).round)`: sampling, batches on device, local training of all clients
  (a lax.map over clients on CPU, core/local.py), aggregation, server step; one dispatch.
* loop: the loop a user would write: one jitted call per client (local_train + adding the
  client's weighted delta), the batch schedules and keys of all clients prepared at once before
  the loop (nothing else per client on the host), then one jitted server step.
* fedjax: FedJAX's way (fedjax 0.0.17 `fed_avg`): a host loop over clients and steps, one jitted
  SGD step per batch, the batch gathered on the host (numpy) and sent to the device, with jax's
  own convolution (its fastest form straight-line). At C > `--fedjax-clients` it is timed on that
  many clients and scaled by C.
  fedjax_ours_ms / r_step_ours: the same host loop on our model's ops (our convolution and
  pooling), the strictest version of that contender.
* "native" runs the model as stock flax writes it (`lax.conv_general_dilated`, `nn.max_pool`:
  the code before issue 12), "fast" with models.base.conv_general_dilated and cnn.max_pool_2x2
  (convolution gradients that stay fast inside loops, a reshape max pool).

gflop: useful FLOPs of the round = C x S x the compiled cost analysis of one plain SGD step
(native convolution, so that im2col copies do not count); flops_frac = gflop / round time /
peak, the peak being the best `jnp.dot` rate (bench_round.dot_peak_gflops). Compile times are
`lower(...).compile()` wall times of the jitted functions.
"""
from __future__ import annotations

import argparse
import importlib
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from experiments.bench_round import _flops, dot_peak_gflops, interleaved, make_data
from fedjax_lab import Setup, models
from fedjax_lab.algorithms import fedavg
from fedjax_lab.core.local import local_train
from fedjax_lab.core.optimizers import make_optimizer
from fedjax_lab.core.rounds import participate
from fedjax_lab.core.skeleton import client_keys

S, B, PER_CLIENT, LR = 10, 10, 50, 0.01
cnn_module = importlib.import_module("fedjax_lab.models.cnn")  # the name is shadowed by models.cnn()


@contextlib.contextmanager
def native_conv():
    """Trace the CNN as stock flax writes it: lax.conv_general_dilated (jax's own gradients) and
    nn.max_pool (reduce_window), i.e. the model before issue 12."""
    saved = cnn_module.conv_general_dilated, cnn_module.max_pool_2x2
    cnn_module.conv_general_dilated = lax.conv_general_dilated
    cnn_module.max_pool_2x2 = lambda z: nn.max_pool(z, (2, 2), strides=(2, 2))
    try:
        yield
    finally:
        cnn_module.conv_general_dilated, cnn_module.max_pool_2x2 = saved


def compiled(fn, *args, native=False):
    """(compiled fn, compile seconds); traced under native_conv() if `native`."""
    with native_conv() if native else contextlib.nullcontext():
        t = time.perf_counter()
        c = jax.jit(fn).lower(*args).compile()
    return c, time.perf_counter() - t


def _med(times):
    return {k: round(statistics.median(v), 2) for k, v in times.items()}


def _min(times):
    return {k: round(min(v), 2) for k, v in times.items()}


def sgd_step_fn(model, tx):
    def sgd_step(params, opt_state, xb, yb):
        loss_fn = lambda w: jnp.mean(model.loss(model.apply(w, xb, train=True), yb))
        updates, opt_state = tx.update(jax.grad(loss_fn)(params), opt_state, params)
        return jax.tree.map(jnp.add, params, updates), opt_state
    return sgd_step


def step_gflop(model, tx, params, xb, yb) -> float:
    step = sgd_step_fn(model, tx)
    c, _ = compiled(step, params, tx.init(params), xb, yb, native=True)
    return _flops(c) / 1e9


def bench_client(reps: int):
    """One client's S steps of batch B in each formulation."""
    model, tx = models.cnn(10), make_optimizer("sgd", LR)
    data = make_data("cnn", 1, PER_CLIENT, (28, 28, 1))
    params = model.init(jax.random.key(0), data.x[:1])
    idx = jax.random.randint(jax.random.key(1), (S, B), 0, PER_CLIENT)
    mask, key = jnp.ones(S, bool), jax.random.key(2)
    args = (params, data.x, data.y, idx, mask, key)
    fns, compile_s, outs = {}, {}, {}
    for name, native, unroll in [("scan_native", True, 1), ("scan_fast", False, 1),
                                 ("unrolled_native", True, True), ("unrolled_fast", False, True)]:
        train = local_train(model, tx, unroll=unroll)
        c, compile_s[name] = compiled(lambda *a: train(*a).params, *args, native=native)
        fns[name] = (lambda c: lambda: c(*args))(c)
    x_host, y_host, idx_host = np.asarray(data.x), np.asarray(data.y), np.asarray(idx)
    for name, native in [("fedjax_native", True), ("fedjax_fast", False)]:   # host loops
        step = sgd_step_fn(model, tx)
        c, compile_s[name] = compiled(step, params, tx.init(params), x_host[idx_host[0]],
                                      y_host[idx_host[0]], native=native)

        def loop(c=c):
            p, s = params, tx.init(params)
            for r in idx_host:
                p, s = c(p, s, x_host[r], y_host[r])
            return p
        fns[name] = loop
    for name, fn in fns.items():
        outs[name] = fn()
    ref = outs["fedjax_native"]
    diff = {name: float(max(jnp.max(jnp.abs(a - b)) for a, b in
                            zip(jax.tree.leaves(o), jax.tree.leaves(ref)))) for name, o in outs.items()}
    gflop = S * step_gflop(model, tx, params, data.x[:B], data.y[:B])
    times = interleaved(fns, reps)
    ms = _med(times)
    return dict(bench="client", S=S, B=B, ms=ms, min_ms=_min(times), compile_s={k: round(v, 2) for k, v in compile_s.items()},
                max_abs_diff_vs_fedjax=diff, gflop=round(gflop, 3),
                gflops={k: round(gflop / v * 1e3, 1) for k, v in ms.items()})


def bench_round(C: int, reps: int, fedjax_clients: int, peak: float):
    model, tx = models.cnn(10), make_optimizer("sgd", LR)
    data = make_data("cnn", C, PER_CLIENT, (28, 28, 1))
    alg = fedavg(model, setup=Setup.of(clients_per_round=C, local_steps=S, batch_size=B,
                                       client_lr=LR))
    state = alg.init(jax.random.key(0), data)
    key = jax.random.key(1)
    k_part, k_train = jax.random.split(key)
    vec_round, round_compile = compiled(alg.round, state, data, key)

    part = jax.jit(lambda k, d: participate(k, d, alg.setup.cohort, alg.setup.work))(k_part, data)
    keys = client_keys(k_train, part.ids)
    weights = np.asarray(part.num_examples, np.float32) * (np.asarray(part.batches.num_steps) > 0)
    # prepared for all clients at once, before the loop
    per_client = [(part.batches.idx[c], part.batches.step_mask[c], keys[c], weights[c])
                  for c in range(C)]
    train = local_train(model, tx)

    def client_call(acc, w_t, x, y, idx, mask, k, weight):
        res = train(w_t, x, y, idx, mask, k)
        return jax.tree.map(lambda a, p, w: a + weight * (p - w), acc, res.params, w_t)

    acc0 = jax.tree.map(jnp.zeros_like, state.params)
    client_c, client_compile = compiled(client_call, acc0, state.params, data.x, data.y,
                                        *per_client[0])
    server_step = jax.jit(lambda w_t, acc, total: jax.tree.map(lambda w, a: w + a / total, w_t, acc))

    def loop_round():
        acc = acc0
        for args in per_client:
            acc = client_c(acc, state.params, data.x, data.y, *args)
        return server_step(state.params, acc, weights.sum())

    steps = {native: compiled(sgd_step_fn(model, tx), state.params, tx.init(state.params),
                              data.x[:B], data.y[:B], native=native)[0] for native in (True, False)}
    x_host, y_host = np.asarray(data.x), np.asarray(data.y)
    idx_host = np.asarray(part.batches.idx)
    kf = min(fedjax_clients, C)

    def fedjax_subset(step_c):
        out = None
        for c in range(kf):
            p, s = state.params, tx.init(state.params)
            for r in idx_host[c]:
                p, s = step_c(p, s, x_host[r], y_host[r])
            out = p
        return out

    fns = {"round": lambda: vec_round(state, data, key), "loop": loop_round,
           "fedjax_subset": lambda: fedjax_subset(steps[True]),
           "fedjax_ours_subset": lambda: fedjax_subset(steps[False])}
    times = interleaved(fns, reps)
    ms, mins = _med(times), _min(times)
    fedjax_ms = ms.pop("fedjax_subset") / kf * C
    fedjax_min = mins["fedjax_subset"] / kf * C
    fedjax_ours_ms = ms.pop("fedjax_ours_subset") / kf * C
    gflop = C * S * step_gflop(model, tx, state.params, data.x[:B], data.y[:B])
    gflops = gflop / (ms["round"] / 1e3)
    return dict(bench="round", C=C, S=S, B=B, round_ms=ms["round"], loop_ms=ms["loop"],
                fedjax_ms=round(fedjax_ms, 1), fedjax_ours_ms=round(fedjax_ours_ms, 1),
                r_step_ours=round(fedjax_ours_ms / ms["round"], 2), fedjax_clients=kf,
                r_client=round(ms["loop"] / ms["round"], 2), r_step=round(fedjax_ms / ms["round"], 2),
                min_ms=dict(round=mins["round"], loop=mins["loop"], fedjax=round(fedjax_min, 1)),
                r_step_of_mins=round(fedjax_min / mins["round"], 2),
                round_compile_s=round(round_compile, 2), client_compile_s=round(client_compile, 2),
                gflop=round(gflop, 2), gflops=round(gflops, 1), peak_gflops=round(peak, 1),
                flops_frac=round(gflops / peak, 3), reps=reps)


def peak_rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory_one(C: int, chunk: int, steps: int, per_client: int):
    """Peak resident memory (VmHWM) of a process that runs one CNN round of C clients: the library
    round, all clients at once (chunk = 0) or LocalWork(client_chunk=chunk) (the weighted mean
    accumulated chunk clients at a time). Run in a fresh subprocess per size."""
    model = models.cnn(10)
    data = make_data("cnn", C, per_client, (28, 28, 1))
    alg = fedavg(model, setup=Setup.of(clients_per_round=C, local_steps=steps, batch_size=B,
                                       client_lr=LR, client_chunk=chunk or None))
    state = alg.init(jax.random.key(0), data)
    base = peak_rss_mb()
    fn = alg.round
    t = time.perf_counter()
    new, metrics = jax.block_until_ready(jax.jit(fn)(state, data, jax.random.key(1)))
    checksum = float(sum(jnp.sum(jnp.abs(a)) for a in jax.tree.leaves(new.params)))
    return dict(bench="memory", C=C, chunk=chunk, steps=steps, per_client=per_client,
                data_mb=round(data.x.nbytes / 2 ** 20, 1), rss_before_round_mb=round(base, 1),
                peak_rss_mb=round(peak_rss_mb(), 1), round_s=round(time.perf_counter() - t, 2),
                local_loss=float(metrics["local_loss"]), params_abs_sum=checksum)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["client", "round", "memory", "_memory_one"])
    ap.add_argument("sizes", nargs="*", type=int, default=[])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--fedjax-clients", type=int, default=8)
    ap.add_argument("--chunk", type=int, nargs="*", default=[0, 10],
                    help="memory: 0 = all clients at once, k = LocalWork(client_chunk=k)")
    ap.add_argument("--steps", type=int, default=1, help="memory: local steps")
    ap.add_argument("--per-client", type=int, default=10, help="memory: examples per client")
    args = ap.parse_args(argv)
    env = dict(backend=jax.default_backend(), cpus=os.cpu_count(),
               load_avg_1min=round(os.getloadavg()[0], 2))
    if args.what == "_memory_one":
        print(json.dumps(memory_one(args.sizes[0], args.chunk[0], args.steps, args.per_client)),
              flush=True)
        return
    print(json.dumps(env), flush=True)
    if args.what == "client":
        print(json.dumps(bench_client(args.reps)), flush=True)
    elif args.what == "round":
        peak = dot_peak_gflops()
        for C in args.sizes or [8, 100]:
            rec = bench_round(C, args.reps, args.fedjax_clients, peak)
            rec["load_avg_1min"] = round(os.getloadavg()[0], 2)
            print(json.dumps(rec), flush=True)
    else:
        for C in args.sizes or [10, 100, 1000]:
            for chunk in args.chunk:
                out = subprocess.run([sys.executable, os.path.abspath(__file__), "_memory_one",
                                      str(C), "--chunk", str(chunk), "--steps", str(args.steps),
                                      "--per-client", str(args.per_client)],
                                     capture_output=True, text=True)
                print(out.stdout.strip() or out.stderr[-2000:], flush=True)


if __name__ == "__main__":
    main()
