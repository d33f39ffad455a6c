"""The golden runs of the composable-API redesign (issue 11): for every registered algorithm,
`fedjax-lab run ALG --dataset synthetic:1,1 --rounds 3 --seed 0` with its defaults, plus Ditto,
FedAMP and FetchSGD on digits. `python -m tests.golden.cases` rewrites the files; the test reruns
the same commands and compares every key to the recorded numbers: bit for bit on the machine that
recorded them (same CPU model, instruction sets and jax), to float32 rounding elsewhere, since XLA:CPU
picks different kernels (AVX-512 or not, FMA contraction) on different processors.

A command's argv is recorded in the file, so the test keeps running exactly what was recorded;
where a flag changes form, FLAG_FORMS maps the old argv to the new one.
"""
from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
COMMON = ["--rounds", "3", "--seed", "0", "--eval-every", "3", "--no-progress"]
DIGITS = "digits:dirichlet=0.3,clients=10"


def cases():
    from fedjax_lab.algorithms import ALGORITHMS
    out = {name: ["run", name, "--dataset", "synthetic:1,1"] + COMMON for name in sorted(ALGORITHMS)}
    out["ditto@digits"] = ["run", "ditto", "--dataset", DIGITS, "--model", "mlp"] + COMMON
    out["fedamp@digits"] = ["run", "fedamp", "--dataset", DIGITS, "--model", "mlp"] + COMMON
    out["fetchsgd@digits"] = ["run", "fetchsgd", "--dataset", DIGITS, "--model", "mlp",
                              "--k", "50", "--sketch-cols", "500"] + COMMON
    return out


def run_case(argv, out_dir):
    from fedjax_lab import cli
    cli.main(list(argv) + ["--out", out_dir])
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def machine() -> str:
    """What decides XLA:CPU's bits: processor model, its vector instruction sets, jax's version."""
    import platform
    import jax
    model, flags = platform.processor(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    vector = sorted(f for f in flags if f.startswith(("avx", "fma", "sse4", "amx")))
    return f"{platform.machine()} | {model} | {' '.join(vector)} | jax {jax.__version__}"


def path(name):
    return os.path.join(HERE, name.replace("@", "_at_") + ".json")


def main():
    import tempfile
    names = sys.argv[1:] or list(cases())
    for name in names:
        argv = cases()[name]
        with tempfile.TemporaryDirectory() as d:
            rows = run_case(argv, os.path.join(d, "run"))
        with open(path(name), "w") as f:
            json.dump({"argv": argv, "machine": machine(), "metrics": rows}, f, indent=1, sort_keys=True)
        print(name, rows[-1].get("test_accuracy"))


if __name__ == "__main__":
    main()
