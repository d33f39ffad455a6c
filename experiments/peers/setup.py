"""Build each peer's environment for `experiments/bench_peers.py`, one venv per peer.

    python experiments/peers/setup.py                 # all peers
    python experiments/peers/setup.py fedjax torch    # some of them
    PEERS_CACHE=/somewhere python experiments/peers/setup.py

Venvs go to $PEERS_CACHE/venvs/<peer> (default ~/.cache/fedjax_lab_peers). Each install is logged to
$PEERS_CACHE/logs/<peer>.log, and $PEERS_CACHE/status.json records, per peer, whether it installed,
how long it took, and the versions of its key packages, so bench_peers.py can skip peers that failed
and the report can say why. Only PyPI (and the machine's own pip wheel folders) is used.

The pins, and why:

* fedjax: FedJAX 0.0.17 calls `jax.tree_map`, removed in jax 0.6, so jax and jaxlib 0.5.3 (both
  exist for CPython 3.11 on PyPI); dm-haiku and optax are left to the resolver under that pin.
* torch: the CPU build of torch (`torch==2.13.0+cpu`, a wheel on this machine's pip find-links
  folder; PyPI's default Linux wheel depends on the nvidia-* CUDA wheels, several GB that a CPU
  run never uses; not downloaded, so not measured).
* pfl: Apple's pfl 0.6.0 with its PyTorch backend (`pfl[pytorch]`), on the same CPU torch.
* flower: Flower's simulation engine (`flwr[simulation]`, Ray underneath), clients train with the
  same CPU torch.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import venv
from pathlib import Path

TORCH = "torch==2.13.0+cpu"
PEERS = {
    "fedjax": ["fedjax==0.0.17", "jax==0.5.3", "jaxlib==0.5.3", "numpy"],
    "torch": [TORCH, "numpy"],
    "pfl": ["pfl[pytorch]==0.6.0", TORCH, "numpy"],
    "flower": ["flwr[simulation]", TORCH, "numpy"],
}
# the distributions whose versions the report names
REPORT = {
    "fedjax": ["fedjax", "jax", "jaxlib", "dm-haiku", "optax", "numpy"],
    "torch": ["torch", "numpy"],
    "pfl": ["pfl", "torch", "numpy"],
    "flower": ["flwr", "ray", "torch", "numpy"],
}
TIMEOUT_S = 900   # one peer's install; a peer that cannot install in this time is reported as failed


def cache_dir() -> Path:
    return Path(os.environ.get("PEERS_CACHE", Path.home() / ".cache" / "fedjax_lab_peers"))


def venv_python(peer: str, root: Path | None = None) -> Path:
    return (root or cache_dir()) / "venvs" / peer / "bin" / "python"


def _versions(python: Path, names) -> dict:
    code = ("import json, sys, importlib.metadata as m\n"
            "out = {}\n"
            "for n in sys.argv[1:]:\n"
            "    try: out[n] = m.version(n)\n"
            "    except m.PackageNotFoundError: out[n] = None\n"
            "print(json.dumps(out))")
    res = subprocess.run([str(python), "-c", code, *names], capture_output=True, text=True)
    return json.loads(res.stdout) if res.returncode == 0 else {}


def install(peer: str, root: Path) -> dict:
    env_dir = root / "venvs" / peer
    log = root / "logs" / f"{peer}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if not venv_python(peer, root).exists():
        venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    cmd = [str(venv_python(peer, root)), "-m", "pip", "install", "--progress-bar", "off", *PEERS[peer]]
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=TIMEOUT_S).returncode
            why = None if rc == 0 else f"pip exited {rc}: see {log}"
        except subprocess.TimeoutExpired:
            rc, why = -1, f"pip install did not finish in {TIMEOUT_S} s"
    if rc == 0:    # installed is not enough: the peer must import
        mod = {"fedjax": "fedjax", "torch": "torch", "pfl": "pfl.model.pytorch",
               "flower": "flwr.simulation"}[peer]
        res = subprocess.run([str(venv_python(peer, root)), "-c", f"import {mod}"],
                             capture_output=True, text=True)
        if res.returncode != 0:
            rc, why = res.returncode, f"import {mod} failed: " + res.stderr.strip().splitlines()[-1]
    return {"ok": rc == 0, "why": why, "install_s": round(time.time() - t0, 1),
            "requested": PEERS[peer], "versions": _versions(venv_python(peer, root), REPORT[peer])}


def main(argv=None) -> int:
    peers = (argv if argv is not None else sys.argv[1:]) or list(PEERS)
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise ValueError(f"peers must be among {sorted(PEERS)}, got {unknown}")
    root = cache_dir()
    status_file = root / "status.json"
    status = json.loads(status_file.read_text()) if status_file.exists() else {}
    for peer in peers:
        print(f"[setup] {peer}: {' '.join(PEERS[peer])}", flush=True)
        status[peer] = install(peer, root)
        print(f"[setup] {peer}: {json.dumps(status[peer])}", flush=True)
        status_file.write_text(json.dumps(status, indent=1))
    return 0 if all(status[p]["ok"] for p in peers) else 1


if __name__ == "__main__":
    sys.exit(main())
