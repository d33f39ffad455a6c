"""experiments/bench_peers.py: its CLI parses and its workload is deterministic and self-consistent
(the peers themselves run only from the benchmark, in their own venvs)."""
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "experiments", "peers")]

from experiments import bench_peers  # noqa: E402
import common                        # noqa: E402

TINY = dict(num_clients=6, per_client=5, cohorts=(2, 6), rounds=2, seed=3)


def test_help_runs():
    res = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "bench_peers.py"),
                          "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "--peers" in res.stdout


def test_workload_is_deterministic(tmp_path):
    a, b = bench_peers.build_workload(**TINY), bench_peers.build_workload(**TINY)
    for name in ("x", "y", "offsets", "w0", "b0"):
        np.testing.assert_array_equal(a[name], b[name])
    for C in TINY["cohorts"]:
        np.testing.assert_array_equal(a["ids"][C], b["ids"][C])
        np.testing.assert_array_equal(a["idx"][C], b["idx"][C])
    c = bench_peers.build_workload(**dict(TINY, seed=4))
    assert not np.array_equal(a["x"], c["x"])


def test_workload_schedule_and_round_trip(tmp_path):
    wl = bench_peers.build_workload(**TINY)
    off = wl["offsets"]
    for C in TINY["cohorts"]:
        ids, idx = wl["ids"][C], wl["idx"][C]
        assert ids.shape == (2, C) and idx.shape == (2, C, 20, 10)
        assert all(len(set(r)) == C for r in ids)          # distinct clients a round
        lo, hi = off[ids][..., None, None], off[ids + 1][..., None, None]
        assert np.all((idx >= lo) & (idx < hi))             # each client trains on its own rows
    np.testing.assert_array_equal(np.sort(wl["ids"][6][0]), np.arange(6))
    back = common.load(str(bench_peers.write_workload(wl, tmp_path / "wl")))
    assert back["rounds"] == 2 and back["client_lr"] == 0.05 and back["cohorts"] == [2, 6]
    np.testing.assert_array_equal(back["idx"][6], wl["idx"][6])
    json.loads((tmp_path / "wl" / "meta.json").read_text())


def test_mean_loss_matches_log_softmax():
    rng = np.random.default_rng(0)
    x, w, b = rng.normal(size=(7, 4)), rng.normal(size=(4, 3)), rng.normal(size=3)
    y = rng.integers(0, 3, 7)
    z = x @ w + b
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    assert abs(common.mean_loss(w, b, x, y) - np.mean(-np.log(p[np.arange(7), y]))) < 1e-12
