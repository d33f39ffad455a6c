"""Every notebook runs top to bottom (code cells executed in order, in one namespace)."""
import glob
import json
import os

import pytest

NOTEBOOKS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "notebooks", "*.ipynb")))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    nb = json.load(open(path))
    namespace = {"__name__": "__notebook__"}
    cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert cells
    for i, cell in enumerate(cells):
        src = "".join(cell["source"])
        exec(compile(src, f"{os.path.basename(path)}[cell {i}]", "exec"), namespace)
