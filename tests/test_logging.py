"""Logging callbacks (core/logging.py) in the driver: CSV read back with csv.DictReader, TensorBoard
event files read back with TensorBoard's own EventAccumulator, Weights & Biases through a stand-in
module (and the ImportError without it); callbacks closed when a run fails; bad callbacks."""
import csv
import json
import math
import os
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lab import Algorithm, models, run
from fedjax_lab.core import logging as L


def counting_algorithm(nan_at=None):
    """A trivial algorithm whose state counts rounds and reports loss 1/t (NaN from `nan_at`):
    the driver's loop, metrics and callbacks without compiling a model."""
    def round_fn(state, data, key):
        t = state + 1
        loss = 1.0 / t.astype(jnp.float32)
        if nan_at is not None:
            loss = jnp.where(t >= nan_at, jnp.nan, loss)
        return t, {"local_loss": loss, "bytes_up": jnp.float32(10.0)}
    return Algorithm(name="counting", init=lambda key, data: jnp.int32(0), round=round_fn,
                     client_params=lambda s, ids: None, model=models.logistic(3))


class FakeRun:
    def __init__(self, config):
        self.config = types.SimpleNamespace(update=lambda c, **kw: self.updates.append(c))
        self.init_config, self.updates, self.logged, self.finished = config, [], [], False

    def log(self, values, step):
        self.logged.append((step, dict(values)))

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    mod = types.ModuleType("wandb")
    mod.runs = []

    def init(config=None, **kwargs):
        mod.runs.append((FakeRun(config), kwargs))
        return mod.runs[-1][0]
    mod.init = init
    monkeypatch.setitem(sys.modules, "wandb", mod)
    return mod


def test_csv_tensorboard_wandb_and_a_function_see_every_record(tmp_path, tiny_data, fake_wandb):
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    seen = []
    tb_dir = tmp_path / "tb"
    loggers = [L.CSVLogger(str(tmp_path / "m.csv")), L.TensorBoardLogger(str(tb_dir)),
               L.WandbLogger("proj", name="r1"), seen.append]
    res = run(counting_algorithm(), tiny_data, rounds=6, key=0, eval_every=2, out=str(tmp_path / "run"),
              progress=False, callbacks=loggers)
    jsonl = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert jsonl == res.history == seen and [r["round"] for r in jsonl] == [2, 4, 6]
    # CSV: the same numbers, "round" first
    with open(tmp_path / "m.csv") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames[0] == "round" and set(reader.fieldnames) == set(jsonl[0])
    for row, rec in zip(rows, jsonl):
        assert {k: float(v) for k, v in row.items()} == {k: float(v) for k, v in rec.items()}
    # TensorBoard: read back by TensorBoard's own reader, one scalar series per metric
    acc = ea.EventAccumulator(str(tb_dir))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == set(jsonl[0]) - {"round"}
    for tag in ("local_loss", "total_bytes_up"):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [2, 4, 6]
        np.testing.assert_allclose([e.value for e in events], [r[tag] for r in jsonl], rtol=1e-6)
    np.testing.assert_allclose([e.value for e in acc.Scalars("local_loss")],
                               [np.mean([1 / 1, 1 / 2]), np.mean([1 / 3, 1 / 4]), np.mean([1 / 5, 1 / 6])],
                               rtol=1e-6)
    # W&B: one run with the config, one log per evaluation at step = round, finished at the end
    (wb, kwargs), = fake_wandb.runs
    assert kwargs == {"project": "proj", "name": "r1"} and wb.init_config["rounds"] == 6
    assert [s for s, _ in wb.logged] == [2, 4, 6] and wb.logged[1][1]["local_loss"] == jsonl[1]["local_loss"]
    assert "round" not in wb.logged[0][1] and wb.finished


def test_callbacks_are_closed_when_the_run_fails(tmp_path, tiny_data):
    tb = L.TensorBoardLogger(str(tmp_path / "tb"))
    log = L.CSVLogger(str(tmp_path / "m.csv"))
    with pytest.raises(FloatingPointError, match="round 3"):
        run(counting_algorithm(nan_at=3), tiny_data, rounds=6, key=0, eval_every=2, progress=False,
            callbacks=[tb, log])
    assert tb._file is None                        # closed
    with open(tmp_path / "m.csv") as f:
        assert [r["round"] for r in csv.DictReader(f)] == ["2"]


def test_csv_rewrites_for_a_new_column_and_replays_history(tmp_path):
    path = str(tmp_path / "m.csv")
    log = L.CSVLogger(path)
    log.on_start({}, [{"round": 1, "a": 0.5}])          # the records restored on resume
    log.on_eval({"round": 2, "a": 0.25})
    log.on_eval({"round": 3, "a": 0.125, "epsilon": 1.5})
    with open(path) as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ["round", "a", "epsilon"]
    assert [(r["round"], r["a"], r["epsilon"]) for r in rows] == \
        [("1", "0.5", ""), ("2", "0.25", ""), ("3", "0.125", "1.5")]


def test_event_file_framing():
    assert L.crc32c(b"123456789") == 0xE3069283               # the CRC-32C check value
    pb = pytest.importorskip("tensorboard.compat.proto.event_pb2")
    data = L.event_bytes(12.5, step=300, scalars={"test_accuracy": 0.75, "epsilon": 2.0})
    ev = pb.Event.FromString(data)
    assert ev.wall_time == 12.5 and ev.step == 300
    assert {v.tag: v.simple_value for v in ev.summary.value} == {"test_accuracy": 0.75, "epsilon": 2.0}
    assert pb.Event.FromString(L.event_bytes(1.0, file_version="brain.Event:2")).file_version == \
        "brain.Event:2"
    record = L.tfrecord(data)
    assert int.from_bytes(record[:8], "little") == len(data) and record[12:-4] == data


def test_non_numeric_and_non_finite_values_are_left_out_of_tensorboard(tmp_path):
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    tb = L.TensorBoardLogger(str(tmp_path))
    tb.on_eval({"round": 1, "a": 1.0, "b": math.inf, "c": "text", "d": True})
    tb.close()
    acc = ea.EventAccumulator(str(tmp_path))
    acc.Reload()
    assert acc.Tags()["scalars"] == ["a"]


def wandb_records(run_file):
    """The records of a .wandb transaction log, read by wandb's own reader (wandb-core's
    `wandb leet inspect --json`: one JSON record per line)."""
    import subprocess
    out = subprocess.run([os.path.join(os.path.dirname(sys.executable), "wandb"), "leet",
                          "inspect", "--json", str(run_file)], capture_output=True, text=True,
                         timeout=120, check=True)
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def test_real_wandb_offline_run_files_hold_every_metric_and_the_config(tmp_path, tiny_data,
                                                                       monkeypatch):
    wandb = pytest.importorskip("wandb", reason="the `wandb` extra is not installed")
    for var, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true",
                       "WANDB_CONSOLE": "off", "WANDB_CONFIG_DIR": str(tmp_path / "config"),
                       "WANDB_CACHE_DIR": str(tmp_path / "cache"),
                       "WANDB_DATA_DIR": str(tmp_path / "data")}.items():
        monkeypatch.setenv(var, value)
    try:
        res = run(counting_algorithm(), tiny_data, rounds=6, key=0, eval_every=2, progress=False,
                  out=str(tmp_path / "run"), extra_config={"note": "offline", "lr": 0.125},
                  callbacks=[L.WandbLogger("fedjax-lab-test", name="counting")])
    finally:
        wandb.teardown()                                   # stop the wandb-core service
    run_file, = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(run_file)
    (meta,) = [r["run"] for r in records if r["type"] == "run"]
    assert meta["project"] == "fedjax-lab-test" and meta["display_name"] == "counting"
    config = json.load(open(tmp_path / "run" / "config.json"))
    logged_config = {k: v for k, v in meta["config"]["update"].items() if k != "_wandb"}
    assert logged_config == config and logged_config["lr"] == 0.125 and config["rounds"] == 6
    history = [r["history"] for r in records if r["type"] == "history"]
    assert [h["step"]["num"] for h in history] == [r["round"] for r in res.history] == [2, 4, 6]
    for h, rec in zip(history, res.history):
        metrics = {k: v for k, v in h["item"].items() if not k.startswith("_")}
        assert set(metrics) == set(rec) - {"round"}
        for k, v in metrics.items():
            assert v == pytest.approx(rec[k], rel=1e-7), k
    assert [r["exit"]["exit_code"] for r in records if r["type"] == "exit"] == [0]


def test_wandb_logger_without_wandb(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)        # import wandb raises ImportError
    with pytest.raises(ImportError, match="pip install wandb"):
        L.WandbLogger("proj")


def test_bad_callbacks_and_accountant(tiny_data):
    with pytest.raises(ValueError, match="callbacks"):
        run(counting_algorithm(), tiny_data, rounds=1, key=0, progress=False, callbacks=[3])
    with pytest.raises(ValueError, match="accountant"):
        run(counting_algorithm(), tiny_data, rounds=1, key=0, progress=False, accountant=3)


def test_a_custom_accountant_adds_its_numbers(tiny_data):
    res = run(counting_algorithm(), tiny_data, rounds=4, key=0, eval_every=2, progress=False,
              accountant=lambda t: {"epsilon": 0.5 * t})
    assert [r["epsilon"] for r in res.history] == [1.0, 2.0]
