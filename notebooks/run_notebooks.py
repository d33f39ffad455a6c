"""Execute the notebooks with a real Jupyter kernel (nbclient) and store them with their outputs.

    python notebooks/run_notebooks.py                 # re-execute every notebook at its stored size, in place
    python notebooks/run_notebooks.py --check         # re-execute at the stored size, compare, write nothing
    python notebooks/run_notebooks.py --size small notebooks/quickstart.ipynb   # the CI size, not stored
    make notebooks                                    # the first line

The size is a parameter: every notebook's first code cell reads the environment variable
FEDJAX_LAB_NOTEBOOK_SIZE, "stored" (default: what a reader sees) or "small" (what the tests run).
A stored notebook records in its metadata (`fedjax_lab`) the size it was executed at and the
SHA-256 of its code cells, so an edited cell that was not re-executed is detected without
running anything (tests/test_notebooks.py); `--check` (a slow test) re-executes at the stored size
and requires every cell's text output (prints, reprs, errors) to match the stored one exactly:
same seeds, same backend, same numbers. Figures (image/png) are not compared byte for byte (their
bytes depend on the matplotlib build); only that each cell that stored a figure still makes one.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import os
import re
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SIZE_VAR = "FEDJAX_LAB_NOTEBOOK_SIZE"
SIZES = ("stored", "small")


def notebooks() -> list:
    return sorted(glob.glob(os.path.join(HERE, "*.ipynb")))


def code_sha(nb) -> str:
    """SHA-256 of the notebook's code cells' sources, in order."""
    h = hashlib.sha256()
    for cell in nb.cells:
        if cell.cell_type == "code":
            h.update(cell.source.encode())
            h.update(b"\0")
    return h.hexdigest()


def execute(path: str, size: str = "stored", *, timeout: int = 900, cwd: str | None = None):
    """The notebook at `path`, executed top to bottom in a fresh python3 kernel at `size`
    (nbclient raises CellExecutionError on the first failing cell)."""
    import nbformat
    from nbclient import NotebookClient
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    nb = nbformat.read(path, as_version=4)
    env_before = os.environ.get(SIZE_VAR)
    os.environ[SIZE_VAR] = size          # the kernel inherits this process's environment
    try:
        with tempfile.TemporaryDirectory() as tmp:
            client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                    resources={"metadata": {"path": cwd or tmp}})
            client.execute()
    finally:
        if env_before is None:
            os.environ.pop(SIZE_VAR, None)
        else:
            os.environ[SIZE_VAR] = env_before
    nb.metadata["fedjax_lab"] = {"size": size, "source_sha256": code_sha(nb)}
    return nb


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_ADDR = re.compile(r"0x[0-9a-fA-F]+")


def cell_outputs(cell) -> tuple:
    """(normalized text outputs, number of figures) of one code cell."""
    texts, figures = [], 0
    for out in cell.get("outputs", []):
        kind = out.get("output_type")
        if kind == "stream":
            texts.append(f"{out['name']}: {out['text']}")
        elif kind in ("execute_result", "display_data"):
            data = out.get("data", {})
            figures += "image/png" in data or "image/svg+xml" in data
            if "text/plain" in data and "image/png" not in data:
                texts.append(data["text/plain"])
        elif kind == "error":
            texts.append(f"{out['ename']}: {out['evalue']}")
    text = _ADDR.sub("0x…", _ANSI.sub("", "".join(t if isinstance(t, str) else "".join(t)
                                                  for t in texts)))
    return text, figures


def differences(stored, fresh) -> list:
    """Human-readable differences between two executions of one notebook's code cells."""
    a = [c for c in stored.cells if c.cell_type == "code"]
    b = [c for c in fresh.cells if c.cell_type == "code"]
    if len(a) != len(b):
        return [f"{len(a)} stored code cells vs {len(b)} executed"]
    out = []
    for i, (ca, cb) in enumerate(zip(a, b)):
        (ta, fa), (tb, fb) = cell_outputs(ca), cell_outputs(cb)
        if ta != tb:
            out.append(f"code cell {i}: stored output\n{ta}\n--- differs from a fresh execution ---\n{tb}")
        if (fa > 0) != (fb > 0):
            out.append(f"code cell {i}: stored {fa} figure(s), a fresh execution made {fb}")
    return out


def stored_problems(path: str) -> list:
    """What is wrong with a stored notebook without executing it: not executed, executed at the
    wrong size, edited since, cells out of order, errors stored."""
    import nbformat
    nb = nbformat.read(path, as_version=4)
    meta = nb.metadata.get("fedjax_lab", {})
    problems = []
    if meta.get("size") != "stored":
        problems.append(f"executed at size {meta.get('size')!r}, not 'stored' "
                        "(run `make notebooks`)")
    if meta.get("source_sha256") != code_sha(nb):
        problems.append("code cells changed since the stored execution (run `make notebooks`)")
    counts = [c.get("execution_count") for c in nb.cells if c.cell_type == "code"]
    if counts != list(range(1, len(counts) + 1)):
        problems.append(f"code cells not executed once, in order: execution counts {counts}")
    for i, c in enumerate(c for c in nb.cells if c.cell_type == "code"):
        if any(o.get("output_type") == "error" for o in c.get("outputs", [])):
            problems.append(f"code cell {i} stored an error")
    return problems


def main(argv=None) -> int:
    import nbformat
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("paths", nargs="*", help="notebooks (default: all in notebooks/)")
    p.add_argument("--check", action="store_true", help="re-execute at the stored size and compare")
    p.add_argument("--size", default="stored", choices=SIZES)
    args = p.parse_args(argv)
    status = 0
    for path in args.paths or notebooks():
        if args.check:
            problems = stored_problems(path) + differences(nbformat.read(path, as_version=4),
                                                           execute(path, "stored"))
            print(f"{os.path.basename(path)}: {'stale' if problems else 'up to date'}")
            for line in problems:
                print("  " + line.replace("\n", "\n  "))
            status |= bool(problems)
            continue
        nb = execute(path, args.size)
        if args.size == "stored":
            nbformat.write(nb, path)
            print(f"executed and stored {path}")
        else:
            print(f"executed {path} at size {args.size} (not stored)")
    return status


if __name__ == "__main__":
    sys.exit(main())
