"""Round benchmark (issue 3): the vectorized FedAvg round against per-client loops, and its FLOP rate.

    python experiments/bench_round.py            # the full table (minutes; C = 100 and 1000)
    python experiments/bench_round.py --quick    # a smoke run on tiny settings (seconds)

One JSON line per (setting, C). All timings of a line are taken in one run, interleaved (one
repeat of each contender in turn, so a change of machine load hits all of them alike), after a
warm-up call, with `block_until_ready`; the line reports medians over `--reps` repeats.

Every contender is the best version of itself we can write (issue 12): the loops make exactly one
jitted dispatch per unit of work and nothing else per unit on the host.

* round_ms: `jax.jit(alg.round)` of `fedjax_lab.algorithms.fedavg` (Setup.of(...)): client
  sampling, on-device batch drawing, vmapped local training, weighted aggregation and the server
  step, one XLA program.
* batch_ms, batch_share: the jitted `participate` alone (sampling + batch drawing) and its share
  of round_ms.
* loop_ms, the loop a user would write: one jitted call prepares every client's batch schedule,
  step mask, key (`fold_in(k_train, id)`, raw key data) and weight for all clients at once on
  device (`participate` + `client_weights`); it is brought to the host once (`jax.device_get`);
  then a Python loop over the C clients makes one jitted call each (`local_train` from w_t on the
  client's numpy slices `idx[c]`, `mask[c]`, `keys[c]`, plus adding its weighted delta to an
  accumulator), and one jitted server step ends the round. Same batches and keys as the round, so
  the same result to float rounding. (Slicing device arrays per client, or unstacking them into a
  tuple of device arrays in one call, measured slower than numpy slices: 187 vs 168 ms at C = 1000.)
* naive_ms, naive `jit(vmap(local_train))` with the schedule built on the host: each round numpy
  samples C clients (`rng.choice(replace=False)`) and draws their batches (one `argsort` of
  uniforms per pass, the same epoch shuffling as core/batching.py, vectorized over clients), the
  [C, S, B] indices, step mask and weights are sent to the device (`jax.device_put`, timed), and
  one jitted call runs `jax.vmap(local_train)` over the clients (keys `split` inside), the
  weighted mean and the server step. r_naive = naive_ms / round_ms (>= 1: our round is no slower).
* step_loop_ms: how FedJAX runs a round: a host loop over clients and steps, one jitted SGD step per
  batch, the batch gathered on the host (numpy) and sent to the device. Estimated from the first
  `step_loop_clients` clients (time per client x C).
* r_client = loop_ms / round_ms, r_naive = naive_ms / round_ms and r_step = step_loop_ms /
  round_ms: how many times faster the vectorized round is (bigger is better).
* gflop: FLOPs of one round from XLA's compiled cost analysis of its vmap formulation (the same
  arithmetic as the lax.map one that local_train picks for large models on CPU). The analysis
  counts a while loop's body once, so the S-step local-training scan is added S - 1 more times,
  its body costed by compiling one vmapped local step (S = 1) on the same shapes.
  gflops = gflop / round time.
* peak_gflops: the best of `jnp.dot` on square float32 matrices (1024 ... 4096) measured in the
  same run; flops_frac = gflops / peak_gflops.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

if __package__ in (None, ""):          # `python experiments/bench_round.py` from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab import Setup, models
from fedjax_lab.algorithms import fedavg
from fedjax_lab.core import local
from fedjax_lab.core.local import local_train
from fedjax_lab.core.optimizers import make_optimizer
from fedjax_lab.core.rounds import client_weights, participate
from fedjax_lab.core.skeleton import client_keys
from fedjax_lab.data import federated_arrays, synthetic

RATIO_NOTE = ("r_client = loop_ms / round_ms, r_naive = naive_ms / round_ms, r_step = step_loop_ms "
              "/ round_ms: times faster than each contender (bigger is better)")

# name -> (model factory, example shape, local steps, batch size, examples per client, repeats)
SETTINGS = {
    "logistic": (lambda: models.logistic(10), (60,), 20, 10, 50, 7),
    "mlp": (lambda: models.mlp(10), (784,), 20, 32, 100, 3),
    "cnn": (lambda: models.cnn(10), (28, 28, 1), 10, 10, 50, 3),
}
FULL = [("logistic", 100), ("logistic", 1000), ("mlp", 100), ("mlp", 1000), ("cnn", 100)]


def make_data(setting: str, num_clients: int, per_client: int, shape, seed: int = 0):
    """Synthetic(1, 1) for the logistic model (FedProx's 60 features); for the MLP and CNN, Gaussian
    inputs of MNIST's shape labelled by a random linear teacher (timing does not depend on the values)."""
    if setting == "logistic":
        return synthetic(1.0, 1.0, num_clients=num_clients, dim=shape[0], min_size=per_client,
                         max_size=per_client, test_fraction=0.0, seed=seed)
    rng = np.random.default_rng(seed)
    total = num_clients * per_client
    x = rng.standard_normal((total,) + tuple(shape), dtype=np.float32)
    teacher = rng.standard_normal((int(np.prod(shape)), 10), dtype=np.float32)
    y = np.argmax(x.reshape(total, -1) @ teacher, axis=1)
    return federated_arrays(x, y, np.arange(num_clients + 1) * per_client, num_classes=10)


def _timed(fn):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    return (time.perf_counter() - t) * 1e3


def interleaved(fns: dict, reps: int) -> dict:
    """ms of each callable over `reps` repeats: warm-up once each, then one call of each in turn."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(_timed(fn))
    return times


def dot_peak_gflops(sizes=(1024, 2048, 4096), reps: int = 5) -> float:
    """Best float32 `jnp.dot` rate (GFLOP/s) over square sizes."""
    dot = jax.jit(jnp.dot)
    best = 0.0
    for n in sizes:
        a = jax.random.normal(jax.random.key(n), (n, n), jnp.float32)
        ms = min(interleaved({"dot": lambda: dot(a, a)}, reps)["dot"])
        best = max(best, 2 * n ** 3 / ms / 1e6)
    return best


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0))


def round_flops(alg, state, data, key, model, client_tx, part, num_steps: int) -> float:
    """FLOPs of one round: compiled cost analysis, the local-step scan counted num_steps times.

    Counted on the vmap formulation of the same round (the same arithmetic): with clients run as a
    lax.map, the cost analysis would see one client's body once."""
    saved = local.MAP_MIN_PARAMS
    local.MAP_MIN_PARAMS = float("inf")      # "auto" resolves to vmap while tracing below
    try:
        # a fresh function, so that jit retraces instead of reusing the lax.map trace
        total = _flops(jax.jit(lambda s, d, k: alg.round(s, d, k)).lower(state, data, key).compile())
        train = jax.vmap(local_train(model, client_tx, clients="vmap"),
                         in_axes=(None, None, None, 0, 0, 0))
        keys = jax.random.split(key, part.ids.shape[0])
        one_step = jax.jit(train).lower(state.params, data.x, data.y, part.batches.idx[:, :1],
                                        part.batches.step_mask[:, :1], keys).compile()
    finally:
        local.MAP_MIN_PARAMS = saved
    return total + (num_steps - 1) * _flops(one_step)


def bench_setting(setting: str, clients_per_round: int, *, num_clients=None, per_client=None,
                  local_steps=None, batch_size=None, reps: int = 3, step_loop_clients: int = 4,
                  peak_gflops=None, data=None, client_lr: float = 0.01) -> dict:
    """Measure one setting (see the module docstring); returns the JSON record."""
    make_model, shape, steps0, batch0, per0, _ = SETTINGS[setting]
    S = local_steps or steps0
    B = batch_size or batch0
    C = clients_per_round
    model = make_model()
    if data is None:
        data = make_data(setting, num_clients or C, per_client or per0, shape)
    alg = fedavg(model, setup=Setup.of(clients_per_round=C, local_steps=S, batch_size=B,
                                       client_lr=client_lr))
    cohort, work = alg.setup.cohort, alg.setup.work
    client_tx = make_optimizer("sgd", client_lr)
    key = jax.random.key(1)
    state = alg.init(jax.random.key(0), data)
    k_part, k_train = jax.random.split(key)          # what fedopt's round does with its key

    vec_round = jax.jit(alg.round)
    draw = jax.jit(lambda k, d: participate(k, d, cohort, work))
    part = draw(k_part, data)

    # --- the loop a user would write: one jitted local_train call per client, nothing else per
    # client on the host. Every client's batch schedule and key are prepared on device for all
    # clients at once (one jitted call), brought to the host once, and sliced there (numpy).
    train = local_train(model, client_tx)

    @jax.jit
    def schedule(k_part, k_train, data):
        p = participate(k_part, data, cohort, work)
        w = client_weights(p, cohort, drop_stragglers=True)
        keys = jax.random.key_data(client_keys(k_train, p.ids))
        return p.batches.idx, p.batches.step_mask, keys, w

    @jax.jit
    def client_call(acc, w_t, x, y, idx, mask, key_data, weight):
        res = train(w_t, x, y, idx, mask, jax.random.wrap_key_data(key_data))
        return jax.tree.map(lambda a, p, w: a + weight * (p - w), acc, res.params, w_t)

    @jax.jit
    def server_step(w_t, acc, total):
        return jax.tree.map(lambda w, a: w + a / total, w_t, acc)

    zeros = jax.jit(lambda w: jax.tree.map(jnp.zeros_like, w))

    def loop_round():
        idx, mask, keys, weights = jax.device_get(schedule(k_part, k_train, data))
        acc = zeros(state.params)
        for c in range(C):
            acc = client_call(acc, state.params, data.x, data.y, idx[c], mask[c], keys[c],
                              weights[c])
        return server_step(state.params, acc, weights.sum())

    # --- naive jit(vmap(local_train)): the schedule (client sample, batches, keys) drawn by numpy
    # on the host each round and sent to the device, then one jitted call for all clients
    # (vmapped local training, weighted mean, server step).
    vtrain = jax.vmap(local_train(model, client_tx), in_axes=(None, None, None, 0, 0, 0))
    offsets_host = np.asarray(data.offsets)
    sizes_host = np.diff(offsets_host)
    width = int(sizes_host.max())
    passes = -(-S * B // max(int(sizes_host.min()), 1))
    rng = np.random.default_rng(0)

    @jax.jit
    def naive_call(w_t, x, y, idx, mask, seed, weights):
        keys = jax.random.split(jax.random.key(seed), idx.shape[0])
        res = vtrain(w_t, x, y, idx, mask, keys)
        p = weights / jnp.sum(weights)
        return jax.tree.map(lambda w, wk: w + jnp.tensordot(p, wk - w, axes=1), w_t, res.params)

    def host_schedule():
        ids = rng.choice(data.num_clients, C, replace=False)
        n, lo = sizes_host[ids], offsets_host[ids]
        u = rng.random((C, passes, width))
        u = np.where(np.arange(width) < n[:, None, None], u, 2.0)      # padding sorts last
        perms = np.argsort(u, axis=-1)                                 # one permutation per pass
        pos = np.arange(S * B)
        local = perms[np.arange(C)[:, None], np.minimum(pos[None, :] // n[:, None], passes - 1),
                      pos[None, :] % n[:, None]]
        idx = (lo[:, None] + local).reshape(C, S, B).astype(np.int32)
        return idx, np.ones((C, S), bool), n.astype(np.float32)

    def naive_round():
        idx, mask, w = host_schedule()
        idx, mask, w = jax.device_put((idx, mask, w))
        return naive_call(state.params, data.x, data.y, idx, mask, rng.integers(1 << 31), w)

    # --- FedJAX-style: host loop over clients and steps, one jitted SGD step per host batch
    @jax.jit
    def sgd_step(params, opt_state, xb, yb):
        loss_fn = lambda w: jnp.mean(model.loss(model.apply(w, xb, train=True), yb))
        grads = jax.grad(loss_fn)(params)
        updates, opt_state = client_tx.update(grads, opt_state, params)
        return jax.tree.map(jnp.add, params, updates), opt_state

    x_host, y_host = np.asarray(data.x), np.asarray(data.y)
    idx_host = np.asarray(part.batches.idx)
    k_step = min(step_loop_clients, C)

    def step_loop_subset():
        out = None
        for c in range(k_step):
            params, opt_state = state.params, client_tx.init(state.params)
            for s in range(S):
                rows = idx_host[c, s]
                params, opt_state = sgd_step(params, opt_state, x_host[rows], y_host[rows])
            out = params
        return out

    # the loop computes the round's FedAvg step (same batches and keys): checked, not assumed
    loop_diff = max(jax.tree.leaves(jax.tree.map(
        lambda a, b: float(jnp.max(jnp.abs(a - b))), loop_round(), vec_round(state, data, key)[0].params)))
    times = interleaved({"round": lambda: vec_round(state, data, key),
                         "batch": lambda: draw(k_part, data), "loop": loop_round,
                         "naive": naive_round,
                         "step_subset": step_loop_subset}, reps)
    ms = {name: statistics.median(ts) for name, ts in times.items()}
    step_loop_ms = ms["step_subset"] / k_step * C
    gflop = round_flops(alg, state, data, key, model, client_tx, part, S) / 1e9
    peak = peak_gflops if peak_gflops is not None else dot_peak_gflops()
    gflops = gflop / (ms["round"] / 1e3)
    return dict(setting=setting, C=C, local_steps=S, batch_size=B,
                round_ms=round(ms["round"], 3), loop_ms=round(ms["loop"], 3),
                naive_ms=round(ms["naive"], 3), r_naive=round(ms["naive"] / ms["round"], 3),
                step_loop_ms=round(step_loop_ms, 3), step_loop_clients=k_step,
                r_client=round(ms["loop"] / ms["round"], 3),
                r_step=round(step_loop_ms / ms["round"], 3),
                batch_ms=round(ms["batch"], 3), batch_share=round(ms["batch"] / ms["round"], 4),
                gflop=round(gflop, 4), gflops=round(gflops, 3), peak_gflops=round(peak, 2),
                flops_frac=round(gflops / peak, 4), reps=reps,
                round_min_ms=round(min(times["round"]), 3), loop_min_ms=round(min(times["loop"]), 3),
                naive_min_ms=round(min(times["naive"]), 3), loop_vs_round_max_abs=loop_diff)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny settings, one repeat (smoke run)")
    ap.add_argument("--only", nargs="*", default=None,
                    help="run only these settings, e.g. logistic:1000 mlp:100")
    ap.add_argument("--reps", type=int, default=None,
                    help="repeats per setting (default: 7 logistic, 3 mlp and cnn)")
    ap.add_argument("--step-loop-clients", type=int, default=4)
    args = ap.parse_args(argv)
    env = dict(backend=jax.default_backend(), device=jax.devices()[0].device_kind,
               xla_flags=os.environ.get("XLA_FLAGS", ""), cpus=os.cpu_count(),
               load_avg_1min=round(os.getloadavg()[0], 2))
    print(json.dumps(dict(note=RATIO_NOTE, **env)), flush=True)
    if args.quick:
        peak = dot_peak_gflops(sizes=(256,), reps=2)
        for setting in ("logistic", "mlp"):
            rec = bench_setting(setting, 8, num_clients=16, per_client=12, local_steps=3,
                                batch_size=4, reps=1, step_loop_clients=2, peak_gflops=peak)
            print(json.dumps(rec), flush=True)
        return
    todo = FULL if args.only is None else [(s.split(":")[0], int(s.split(":")[1])) for s in args.only]
    datasets = {}
    for setting, C in todo:
        per = SETTINGS[setting][4]
        if setting not in datasets:      # one population of max(C) clients per setting
            n = max(c for s, c in todo if s == setting)
            datasets[setting] = make_data(setting, n, per, SETTINGS[setting][1])
        reps = args.reps or SETTINGS[setting][5]
        peak = dot_peak_gflops(reps=max(reps, 3))
        rec = bench_setting(setting, C, data=datasets[setting], reps=reps,
                            step_loop_clients=args.step_loop_clients, peak_gflops=peak)
        rec["load_avg_1min"] = round(os.getloadavg()[0], 2)
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
