"""Unchanged results across refactors: the golden runs of tests/golden/cases.py.

Bit-identical on the machine that recorded a file (its `machine` entry); elsewhere equal to float32
rounding (rtol 1e-5), because XLA:CPU's kernels differ between processors. The files of issue 11 were
recorded before the entry existed, so they are compared to rounding everywhere.
"""
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
    exact = golden.get("machine") == cases.machine()
    rows = cases.run_case(golden["argv"], str(tmp_path / "run"))
    assert len(rows) == len(golden["metrics"])
    for got, want in zip(rows, golden["metrics"]):
        for key, value in want.items():
            assert key in got, f"{key} is gone from the metrics"
            if exact or not isinstance(value, float):
                assert got[key] == value, f"{key}: {got[key]!r} != golden {value!r}"
            else:
                assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), \
                    f"{key}: {got[key]!r} != golden {value!r} (to rounding: recorded on another machine)"
