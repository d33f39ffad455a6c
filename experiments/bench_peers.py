"""Peers benchmark (issue 12): FedAvg on one workload in fedjax_lab and in other FL systems.

    python experiments/peers/setup.py        # once: one venv per peer under the cache folder
    python experiments/bench_peers.py        # every peer that installed, one after another
    python experiments/bench_peers.py --quick --peers ours,torch_loop   # a smoke run (seconds)

The workload, the same for all: multinomial logistic regression 60 -> 10 (a linear layer and the
softmax cross-entropy), FedProx's Synthetic(1, 1) with 1,000 clients x 50 examples, C = 100 and
C = 1000 clients a round, 20 local SGD steps of batch 10 at lr 0.05 from the same initial model,
FedAvg with server lr 1 and weights n_k. bench_peers.py writes it once as .npy files into
$PEERS_CACHE/workload (default ~/.cache/fedjax_lab_peers): data, initial model, and for every
round the cohort and the rows of each local batch, drawn by fedjax_lab's own `participate` with
the keys its round uses. Every peer trains exactly these cohorts on exactly these batches, so all
compute the same FedAvg and their final losses agree to float rounding (printed, and the largest
parameter difference to ours).

Each system runs in its own venv in a subprocess (experiments/peers/run_*.py; their docstrings say
how each contender is built): R rounds at C = 100, then R at C = 1000, timed per round; round 0
(compilation, warm caches) is left out and the median of the others reported. Peers run one after
another in one run, so they see the same machine; the load average is printed before and after.
Each contender is the best version of itself we could write (no per-step host work beyond what the
framework needs). Threads: XLA (ours, FedJAX) uses all cores. The torch loops and pfl run with
`torch.set_num_threads(1)` by default (`--threads`): their ops (a 10 x 60 matmul) are far below
torch's parallel grain, and with 2 threads the same loop ran 10-25x slower here (OpenMP threads
waiting on each other on a busy 2-core machine; quick workload, C = 40: 0.30 s vs 7.8 s a round).
Flower runs one Ray actor per core, each on one torch thread, so it uses all cores. `ours_1core`
is ours pinned to one core (`taskset -c 0`), the like-for-like row against the one-thread loops.

Output: one JSON line per (system, C) and a markdown table (round ms, ratio to ours, final loss).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):          # `python experiments/bench_peers.py` from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PEERS_DIR = ROOT / "experiments" / "peers"
# system -> (venv from peers/setup.py or None for ours, runner, extra runner arguments, prefix)
SYSTEMS = {
    "ours": (None, "run_ours.py", [], []),
    "ours_1core": (None, "run_ours.py", ["--name", "ours_1core"], ["taskset", "-c", "0"]),
    "fedjax": ("fedjax", "run_fedjax.py", [], []),
    "torch_loop": ("torch", "run_torch_loop.py", ["--variant", "tensors"], []),
    "torch_dataloader": ("torch", "run_torch_loop.py", ["--variant", "dataloader"], []),
    "pfl": ("pfl", "run_pfl.py", [], []),
    "flower": ("flower", "run_flower.py", ["--threads", str(os.cpu_count())], []),
}
TORCH_THREADS = ("torch_loop", "torch_dataloader", "pfl")
FULL = dict(num_clients=1000, per_client=50, cohorts=(100, 1000), rounds=6)
QUICK = dict(num_clients=40, per_client=50, cohorts=(10, 40), rounds=3)
WORK = dict(local_steps=20, batch_size=10, client_lr=0.05, dim=60, num_classes=10)


def cache_dir() -> Path:
    return Path(os.environ.get("PEERS_CACHE", Path.home() / ".cache" / "fedjax_lab_peers"))


def round_key(seed: int, C: int, r: int):
    """The key of round r of the C-clients run (ours uses it; the schedule is drawn from it)."""
    import jax
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), C), r)


def make_algorithm(model, wl: dict, C: int):
    """fedjax_lab's FedAvg for the workload at C clients a round (n_k weights, server lr 1)."""
    from fedjax_lab import Setup
    from fedjax_lab.algorithms import fedavg
    return fedavg(model, setup=Setup.of(clients_per_round=C, local_steps=wl["local_steps"],
                                        batch_size=wl["batch_size"], client_lr=wl["client_lr"],
                                        weighting="examples"))


def build_workload(*, num_clients: int, per_client: int, cohorts, rounds: int, seed: int = 0) -> dict:
    """The common workload as numpy arrays (deterministic in its arguments; see common.py)."""
    import jax
    from fedjax_lab import models
    from fedjax_lab.data import synthetic
    data = synthetic(1.0, 1.0, num_clients=num_clients, dim=WORK["dim"],
                     num_classes=WORK["num_classes"], min_size=per_client, max_size=per_client,
                     test_fraction=0.0, seed=seed)
    model = models.logistic(WORK["num_classes"])
    p0 = model.init(jax.random.PRNGKey(seed), data.x[:1])["Dense_0"]
    wl = dict(WORK, seed=seed, num_clients=num_clients, per_client=per_client,
              cohorts=[int(c) for c in cohorts], rounds=rounds, server_lr=1.0,
              x=np.asarray(data.x, np.float32), y=np.asarray(data.y, np.int64),
              offsets=np.asarray(data.offsets, np.int64),
              w0=np.asarray(p0["kernel"]), b0=np.asarray(p0["bias"]), ids={}, idx={})
    for C in wl["cohorts"]:
        alg = make_algorithm(model, wl, C)
        ids, idx = [], []
        for r in range(rounds):
            part = alg.server_round.participate(jax.random.split(round_key(seed, C, r))[0], data)
            if not bool(np.all(part.batches.step_mask)):
                raise ValueError("the workload must give every client all its steps")
            ids.append(np.asarray(part.ids))
            idx.append(np.asarray(part.batches.idx))
        wl["ids"][C], wl["idx"][C] = np.stack(ids).astype(np.int64), np.stack(idx).astype(np.int64)
    return wl


def write_workload(wl: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for name in ("x", "y", "offsets", "w0", "b0"):
        np.save(out / f"{name}.npy", wl[name])
    for C in wl["cohorts"]:
        np.save(out / f"ids_C{C}.npy", wl["ids"][C])
        np.save(out / f"idx_C{C}.npy", wl["idx"][C])
    meta = {k: v for k, v in wl.items() if not isinstance(v, (np.ndarray, dict))}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return out


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def run_system(name: str, workload: Path, *, threads: int, timeout: int, status: dict) -> list:
    env_name, runner, extra, prefix = SYSTEMS[name]
    if env_name is None:
        python = sys.executable
    else:
        python = str(cache_dir() / "venvs" / env_name / "bin" / "python")
        st = status.get(env_name)
        if st is None or not st.get("ok") or not os.path.exists(python):
            why = "not set up" if st is None else (st.get("why") or "install failed")
            return [dict(system=name, error=f"venv {env_name}: {why}")]
    cmd = [*prefix, python, str(PEERS_DIR / runner), str(workload), *extra]
    if name in TORCH_THREADS:
        cmd += ["--threads", str(threads)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        rows = [json.loads(l[7:]) for l in out.splitlines() if l.startswith("RESULT ")]
        return rows + [dict(system=name, error=f"timed out after {timeout} s")]
    rows = [json.loads(l[7:]) for l in res.stdout.splitlines() if l.startswith("RESULT ")]
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or ["?"])[-1]
        rows.append(dict(system=name, error=f"exit {res.returncode}: {tail[:300]}"))
    return rows


def compare(rows: list, workload: Path) -> None:
    """Ratio to ours and the largest parameter difference to ours, per C."""
    ours = {r["C"]: r for r in rows if r.get("system") == "ours" and "C" in r}
    out = workload / "out"
    for r in rows:
        if "C" not in r or r["C"] not in ours:
            continue
        r["ratio_to_ours"] = round(r["round_ms"] / ours[r["C"]]["round_ms"], 2)
        a, b = np.load(out / f"{r['system']}_C{r['C']}.npz"), np.load(out / f"ours_C{r['C']}.npz")
        r["max_param_diff"] = float(max(np.abs(a["w"] - b["w"]).max(), np.abs(a["b"] - b["b"]).max()))


def table(rows: list, cohorts) -> str:
    by = {}
    for r in rows:
        if "C" in r:
            by.setdefault(r["system"], {})[r["C"]] = r
    head = ("| system | version | " + " | ".join(f"round ms, C = {C}" for C in cohorts) + " | "
            + " | ".join(f"x ours, C = {C}" for C in cohorts) + " | final loss (C = "
            + f"{cohorts[-1]}) | max param diff to ours |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for name, per in by.items():
        last = per.get(cohorts[-1], next(iter(per.values())))
        cells = [name, last["version"]]
        cells += [f"{per[C]['round_ms']:.1f}" if C in per else "-" for C in cohorts]
        cells += [f"{per[C].get('ratio_to_ours', float('nan')):.1f}" if C in per else "-"
                  for C in cohorts]
        cells += [f"{last['final_loss']:.6f}", f"{last.get('max_param_diff', float('nan')):.1e}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="FedAvg in fedjax_lab and in peer FL systems, on one "
                                 "workload (see the module docstring).")
    ap.add_argument("--peers", default=",".join(SYSTEMS),
                    help=f"comma-separated, among {','.join(SYSTEMS)}")
    ap.add_argument("--quick", action="store_true", help="tiny workload (40 clients, 3 rounds)")
    ap.add_argument("--rounds", type=int, help="rounds per C (default 6; round 0 is not timed)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads of the torch loops and pfl (default 1, their "
                    "fastest here; see the module docstring)")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per system")
    ap.add_argument("--json", help="also append the JSON lines to this file")
    args = ap.parse_args(argv)
    peers = args.peers.split(",")
    bad = [p for p in peers if p not in SYSTEMS]
    if bad:
        raise ValueError(f"--peers must be among {list(SYSTEMS)}, got {bad}")
    cfg = dict(QUICK if args.quick else FULL)
    if args.rounds is not None:
        cfg["rounds"] = args.rounds
    workload = write_workload(build_workload(**cfg), cache_dir() / ("workload_quick" if args.quick
                                                                     else "workload"))
    status_file = cache_dir() / "status.json"
    status = json.loads(status_file.read_text()) if status_file.exists() else {}
    print(f"# workload {workload}: {cfg}; threads {args.threads}; load average {load_average()}",
          flush=True)
    rows = []
    for name in peers:
        t0 = time.time()
        got = run_system(name, workload, threads=args.threads, timeout=args.timeout, status=status)
        for r in got:
            r.setdefault("system", name)
        rows += got
        print(f"# {name}: {time.time() - t0:.0f} s, load average {load_average()}", flush=True)
        for r in got:
            print(json.dumps({k: v for k, v in r.items() if k != "rounds_ms"}), flush=True)
    compare(rows, workload)
    for r in rows:
        r["load_average_end"] = load_average()
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    print(table(rows, cfg["cohorts"]))
    for r in rows:
        if "error" in r:
            print(f"# {r['system']} failed: {r['error']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
