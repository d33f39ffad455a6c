"""What every peer runner shares (numpy and the standard library only: it is imported in each
peer's own venv). The workload is written once by `experiments/bench_peers.py`:

    DIR/x.npy [N, 60] float32, y.npy [N] int64, offsets.npy [K + 1]     the clients' examples
    DIR/w0.npy [60, 10], b0.npy [10]                                    the initial model
    DIR/ids_C{C}.npy [R, C], idx_C{C}.npy [R, C, S, B]                  who trains, on which rows
    DIR/meta.json                                                       lr, steps, batch, rounds

idx holds rows of x (global), so client ids[r, j] runs step s of round r on x[idx[r, j, s]].
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

import numpy as np


def load(workload_dir: str) -> dict:
    """The workload as numpy arrays, plus meta's fields, with schedules under 'ids'/'idx' by C."""
    d = os.path.abspath(workload_dir)
    with open(os.path.join(d, "meta.json")) as f:
        wl = json.load(f)
    for name in ("x", "y", "offsets", "w0", "b0"):
        wl[name] = np.load(os.path.join(d, f"{name}.npy"))
    wl["ids"] = {C: np.load(os.path.join(d, f"ids_C{C}.npy")) for C in wl["cohorts"]}
    wl["idx"] = {C: np.load(os.path.join(d, f"idx_C{C}.npy")) for C in wl["cohorts"]}
    wl["dir"] = d
    return wl


def mean_loss(w, b, x, y) -> float:
    """Mean softmax cross-entropy of logits x w + b over all examples (float64)."""
    z = x.astype(np.float64) @ np.asarray(w, np.float64) + np.asarray(b, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1))
    return float(np.mean(lse - z[np.arange(len(y)), y]))


class Timer:
    """Round times in ms; round 0 (compilation, warm caches) is left out of the median."""
    def __init__(self):
        self.ms = []

    def __enter__(self):
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.ms.append((time.perf_counter() - self._t0) * 1e3)

    def median(self) -> float:
        return statistics.median(self.ms[1:] if len(self.ms) > 1 else self.ms)


def emit(wl, *, system: str, version: str, C: int, timer: Timer, w, b, **extra):
    """Save the final model next to the workload and print the result line bench_peers reads."""
    out = os.path.join(wl["dir"], "out")
    os.makedirs(out, exist_ok=True)
    np.savez(os.path.join(out, f"{system}_C{C}.npz"), w=np.asarray(w, np.float32),
             b=np.asarray(b, np.float32))
    res = dict(system=system, version=version, C=C, round_ms=round(timer.median(), 3),
               rounds_ms=[round(t, 3) for t in timer.ms],
               final_loss=mean_loss(w, b, wl["x"], wl["y"]), **extra)
    print("RESULT " + json.dumps(res), flush=True)
    sys.stdout.flush()
    return res
