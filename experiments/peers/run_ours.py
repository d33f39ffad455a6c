"""fedjax_lab's FedAvg on the peers' workload: `jax.jit(fedavg(model, setup=Setup.of(...)).round)`.

Run by experiments/bench_peers.py in the project's own venv:
    python experiments/peers/run_ours.py WORKLOAD_DIR [--reps 20]

One jitted program per round: client sampling, on-device batch drawing, the vmapped 20-step local
SGD of all C clients, the n_k-weighted mean and the server step. The round keys are those
bench_peers.py drew the common schedule with, so this run trains exactly the cohorts and batches
every peer trains (checked here: the round's own participation equals the stored ids and rows).
The first round (compilation) is left out; the median is over the other rounds and `--reps`
more calls of the round on the final state (results discarded, so the loss is that of R rounds).
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(os.path.dirname(HERE))]

import jax                     # noqa: E402
import numpy as np             # noqa: E402

import common                  # noqa: E402
import fedjax_lab              # noqa: E402
from experiments.bench_peers import make_algorithm, round_key   # noqa: E402
from fedjax_lab import models  # noqa: E402
from fedjax_lab.data import federated_arrays  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workload")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--name", default="ours", help="the system name in the result line")
    args = ap.parse_args(argv)
    wl = common.load(args.workload)
    data = federated_arrays(wl["x"], wl["y"].astype(np.int32), wl["offsets"], num_classes=10)
    for C in wl["cohorts"]:
        alg = make_algorithm(models.logistic(10), wl, C)
        state = alg.init(jax.random.PRNGKey(wl["seed"]), data)
        w = state.params["Dense_0"]
        assert np.array_equal(w["kernel"], wl["w0"]) and np.array_equal(w["bias"], wl["b0"])
        rnd = jax.jit(alg.round)
        timer = common.Timer()
        for r in range(wl["rounds"]):
            key = round_key(wl["seed"], C, r)
            if r == 0:   # same cohort and rows as the peers (outside the timing)
                part = alg.server_round.participate(jax.random.split(key)[0], data)
                assert np.array_equal(part.ids, wl["ids"][C][r])
                assert np.array_equal(part.batches.idx, wl["idx"][C][r])
            with timer:
                state, _ = rnd(state, data, key)
                jax.block_until_ready(state)
        extra = round_key(wl["seed"], C, wl["rounds"])
        for _ in range(args.reps):
            with timer:
                jax.block_until_ready(rnd(state, data, extra))
        w = state.params["Dense_0"]
        common.emit(wl, system=args.name, version=f"fedjax_lab {fedjax_lab.__version__}, jax "
                    f"{jax.__version__}", C=C, timer=timer, w=w["kernel"], b=w["bias"])


if __name__ == "__main__":
    main()
