"""Logging callbacks for the driver: `run(..., callbacks=[CSVLogger(path), TensorBoardLogger(dir),
WandbLogger(project)])`. Each receives, at every evaluation, the record the driver writes to
metrics.jsonl ({"round": t, "test_accuracy": ..., "local_loss": ..., "epsilon": ...}).

None is a hard dependency: CSV is the standard library; TensorBoard event files are written by a
small writer of the event protocol buffer in TFRecord framing (below), with no TensorFlow,
tensorboardX or protobuf import, and read by TensorBoard itself (tests use its EventAccumulator);
Weights & Biases is used when `wandb` is installed (ImportError naming the package otherwise).

A callback is an object with on_eval(record) and, optionally, on_start(config, history) (the run's
config and, when resuming, the records restored from metrics.jsonl) and close(); a plain function
record -> None also works.
"""
from __future__ import annotations

import csv
import math
import numbers
import os
import socket
import struct
import time
from typing import Optional


class CSVLogger:
    """One row per evaluation in `path`, columns "round" then the other names sorted. A name that
    first appears later (e.g. a metric only some evaluations have) rewrites the file with the new
    column, earlier rows leaving it empty. On resume the restored records are written first."""

    def __init__(self, path: str):
        self.path = path
        self.rows: list = []
        self.fields: list = []

    def on_start(self, config, history):
        self.rows = [dict(r) for r in history]
        self._rewrite()

    def on_eval(self, record):
        self.rows.append(dict(record))
        if set(record) - set(self.fields):
            self._rewrite()
        else:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, self.fields).writerow(record)

    def _rewrite(self):
        names = {k for r in self.rows for k in r}
        self.fields = ["round"] * ("round" in names) + sorted(names - {"round"})
        d = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(d, exist_ok=True)
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, self.fields)
            w.writeheader()
            w.writerows(self.rows)

    def close(self):
        pass


# ----------------------------------------------------------------- TensorBoard event files

def _crc32c_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum of TFRecord framing."""
    c = 0xFFFFFFFF
    for b in data:
        c = _CRC_TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1        # int64 two's complement, as protobuf encodes negative int64
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:      # length-delimited (wire type 2)
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def event_bytes(wall_time: float, *, step: int = 0, file_version: Optional[str] = None,
                scalars: Optional[dict] = None) -> bytes:
    """An `Event` message (tensorflow/core/util/event.proto): wall_time = 1 (double), step = 2
    (int64), file_version = 3 (string), summary = 5 (Summary: value = 1, repeated Value: tag = 1
    (string), simple_value = 2 (float))."""
    out = _varint(1 << 3 | 1) + struct.pack("<d", wall_time)
    if step:
        out += _varint(2 << 3 | 0) + _varint(step)
    if file_version is not None:
        out += _field(3, file_version.encode())
    if scalars:
        values = b"".join(_field(1, _field(1, tag.encode()) + _varint(2 << 3 | 5)
                                 + struct.pack("<f", value)) for tag, value in scalars.items())
        out += _field(5, values)
    return out


def tfrecord(data: bytes) -> bytes:
    """TFRecord framing: length (uint64), masked CRC-32C of the length, data, masked CRC of data."""
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc(header)) + data + struct.pack("<I", masked_crc(data))


class TensorBoardLogger:
    """Scalars of every record to an event file in `logdir` (tag = the metric's name, step = the
    round; non-numeric and non-finite values are skipped); `tensorboard --logdir DIR` shows them."""

    def __init__(self, logdir: str, *, flush_every: int = 1):
        self.logdir = logdir
        self.flush_every = flush_every
        self._file = None
        self._pending = 0

    def _open(self):
        os.makedirs(self.logdir, exist_ok=True)
        name = f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}"
        self.path = os.path.join(self.logdir, name)
        self._file = open(self.path, "wb")
        self._file.write(tfrecord(event_bytes(time.time(), file_version="brain.Event:2")))

    def on_start(self, config, history):
        if self._file is None:
            self._open()

    def on_eval(self, record):
        if self._file is None:
            self._open()
        scalars = {k: float(v) for k, v in record.items() if k != "round"
                   and isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)}
        self._file.write(tfrecord(event_bytes(time.time(), step=int(record["round"]),
                                              scalars=scalars)))
        self._pending += 1
        if self._pending >= self.flush_every:
            self._file.flush()
            self._pending = 0

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None


class WandbLogger:
    """Log every record to Weights & Biases (`wandb.init(project=..., config=the run's config,
    **init_kwargs)` at the start, `run.log(record, step=round)`, `run.finish()` at the end), or to
    a run you pass in (`run=`, left open). Needs the `wandb` extra (`pip install wandb`).

    With no network, `WANDB_MODE=offline` (or `mode="offline"`; `dir=` or WANDB_DIR for where)
    writes the run to `wandb/offline-run-*/run-*.wandb`, for `wandb sync` later or for reading
    with `wandb leet inspect --json` (tests/test_logging.py reads every metric and the config back
    from it with the real package)."""

    def __init__(self, project: Optional[str] = None, *, run=None, **init_kwargs):
        try:
            import wandb
        except ImportError as e:
            raise ImportError("WandbLogger needs Weights & Biases: pip install wandb (the extra: "
                              "pip install 'fedjax_lab[wandb]')") from e
        self._wandb = wandb
        self._init = dict(init_kwargs, project=project)
        self.run = run
        self._owns_run = run is None

    def on_start(self, config, history):
        if self.run is None:
            self.run = self._wandb.init(config=config, **self._init)
        else:
            self.run.config.update(config, allow_val_change=True)

    def on_eval(self, record):
        if self.run is None:
            self.on_start({}, [])
        self.run.log({k: v for k, v in record.items() if k != "round"}, step=int(record["round"]))

    def close(self):
        if self._owns_run and self.run is not None:
            self.run.finish()
            self.run = None
