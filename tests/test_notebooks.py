"""Every notebook runs top to bottom in a real Jupyter kernel (nbclient) at the small size, and the
stored, executed notebooks are not stale (notebooks/run_notebooks.py describes the scheme):

  * default suite: a fresh python3 kernel executes each notebook at FEDJAX_LAB_NOTEBOOK_SIZE=small
    (with JAX_DISABLE_MOST_OPTIMIZATIONS=1: this run checks that every cell runs, not its
    numbers, and compiling dominates it); the stored notebook was executed at size "stored", in
    order, without errors, with figures, and its code cells are those that were executed (SHA-256 in
    its metadata);
  * slow: a fresh kernel re-executes the notebook at the stored size and every cell's text output
    equals the stored one (same seeds, same backend: same numbers).
"""
import glob
import importlib.util
import os

import nbformat
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
NOTEBOOKS = sorted(glob.glob(os.path.join(HERE, "..", "notebooks", "*.ipynb")))
_spec = importlib.util.spec_from_file_location(
    "run_notebooks", os.path.join(HERE, "..", "notebooks", "run_notebooks.py"))
run_notebooks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_notebooks)


def test_the_tutorials_are_there():
    names = {os.path.basename(p) for p in NOTEBOOKS}
    assert {"quickstart.ipynb", "write_your_own_algorithm.ipynb",
            "compression_and_robustness.ipynb", "personalization_tour.ipynb"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_in_a_kernel_at_the_small_size(path, tmp_path, monkeypatch):
    monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
    nb = run_notebooks.execute(path, "small", timeout=600, cwd=str(tmp_path))   # raises on a failing cell
    assert nb.metadata["fedjax_lab"]["size"] == "small"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    assert sum(run_notebooks.cell_outputs(c)[1] for c in code) >= 1        # it drew its figures


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_stored_notebook_is_executed_and_current(path):
    assert run_notebooks.stored_problems(path) == []
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    outputs = [run_notebooks.cell_outputs(c) for c in code]
    assert sum(f for _, f in outputs) >= 1, "a stored notebook shows its figures"
    assert sum(bool(t.strip()) for t, _ in outputs) >= 2, "a stored notebook shows its tables"


def test_staleness_check_notices_an_edit(tmp_path):
    path = NOTEBOOKS[0]
    nb = nbformat.read(path, as_version=4)
    cell = next(c for c in nb.cells if c.cell_type == "code")
    cell.source += "\n# edited"
    edited = tmp_path / "edited.ipynb"
    nbformat.write(nb, str(edited))
    assert any("code cells changed" in p for p in run_notebooks.stored_problems(str(edited)))
    stale = nbformat.read(path, as_version=4)
    target = next(c for c in stale.cells if c.cell_type == "code"
                  and run_notebooks.cell_outputs(c)[0] and not run_notebooks.cell_outputs(c)[1])
    fresh = nbformat.read(path, as_version=4)
    for c in stale.cells:
        if c is target:
            c.outputs = [nbformat.v4.new_output("stream", name="stdout", text="0.123\n")]
    assert run_notebooks.differences(fresh, fresh) == []
    diff = run_notebooks.differences(stale, fresh)
    assert len(diff) == 1 and "0.123" in diff[0]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_stored_outputs_match_a_fresh_execution(path, tmp_path, monkeypatch):
    # stored by `make notebooks` with XLA's full optimization; tests/conftest.py exports -O0
    monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "0")
    stored = nbformat.read(path, as_version=4)
    fresh = run_notebooks.execute(path, "stored", timeout=1800, cwd=str(tmp_path))
    assert run_notebooks.differences(stored, fresh) == []
