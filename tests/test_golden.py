"""Bit-identical results across the API redesign: the golden runs of tests/golden/cases.py."""
import glob
import json
import os

import pytest

from tests.golden import cases

FILES = sorted(glob.glob(os.path.join(cases.HERE, "*.json")))


@pytest.mark.parametrize("path", FILES, ids=[os.path.basename(p)[:-5] for p in FILES])
def test_golden_run_is_unchanged(path, tmp_path):
    with open(path) as f:
        golden = json.load(f)
    rows = cases.run_case(golden["argv"], str(tmp_path / "run"))
    assert len(rows) == len(golden["metrics"])
    for got, want in zip(rows, golden["metrics"]):
        for key, value in want.items():
            assert key in got, f"{key} is gone from the metrics"
            assert got[key] == value, f"{key}: {got[key]!r} != golden {value!r}"
