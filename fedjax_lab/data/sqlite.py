"""FedJAX's SQLite federated datasets (EMNIST-62, Shakespeare, Stack Overflow, CIFAR-100 as FedJAX
ships them, e.g. `federated_emnist_train.sqlite`), with the client structure kept.

Format (FedJAX `fedjax/core/sqlite_federated_data.py`, `SQLiteFederatedData`): one table
    CREATE TABLE federated_data (client_id BLOB NOT NULL PRIMARY KEY, data BLOB NOT NULL,
                                 num_examples INTEGER NOT NULL);
where `data` is zlib-compressed msgpack of a dict {feature name: numpy array} (FedJAX
`core/serialization.py`: msgpack extension type 1 packs a numeric ndarray as (shape, dtype name,
C-order bytes), 3 a numpy scalar the same way, 4 an object array of bytes as (shape, flat list)).
Clients are read in rowid order, as FedJAX iterates them. FedJAX ships train and test as separate
files with the same client ids; the test file is found by replacing `train` with `test` in the file
name (or given as `test_path`), and client k's test split is its rows there. Without a test file
each client holds out `test_fraction` of its examples. A file that is not in this format (not a
database, no such table, an undecodable blob, missing features of the task) raises ValueError
naming it.

Tasks, inferred from the feature names (or forced with `task=`):
  emnist         pixels [N, 28, 28] float32, label -> x = 1 - pixels, [N, 28, 28, 1] (FedJAX's
                 `emnist.preprocess_batch` flip: ink 1, background 0); 62 classes, or 10 when the
                 file name says `digitsonly`.
  shakespeare    snippets (bytes) -> LEAF's next-character task: a client's snippets are joined
                 with newlines, every position with 80 earlier characters gives x = those 80 char ids
                 (LEAF vocabulary, see data.leaf), y = the next char. FedJAX instead predicts every
                 position of BOS/EOS-delimited 80-char chunks (per-position targets); we keep LEAF's
                 single-label task because FederatedArrays holds one label per example. Clients with
                 no full window are dropped (with a warning).
  stackoverflow  tokens (space-separated bytes) -> next-word prediction. Every post becomes
                 [BOS, w_1..w_n, EOS]; each position t >= 1 gives one example: x = the `seq_len`
                 (default 20, FedJAX's training length) tokens before t, left-padded with PAD inside
                 the post, y = token t. Ids as in FedJAX's `StackoverflowTokenizer`: 0 PAD, 1 BOS,
                 2 EOS, words 3..V+2, one OOV bucket V+3; num_classes = V + 4. The vocabulary is the
                 `vocab_size` (default 10,000) most frequent words: from a word-count file
                 (`vocab=`, one `word count` per line, most frequent first, like FedJAX's
                 `stackoverflow.word_count`) or, offline by default, counted over the training file.
                 FedJAX's per-position targets over a post of <= seq_len tokens are exactly these
                 (context, next word) pairs.
  cifar100       image [N, 32, 32, 3] uint8, label -> image / 255 standardized per channel with the
                 training file's mean and std; 100 classes.
  arrays         x, y: any numeric features and integer labels, used as they are.
"""
from __future__ import annotations

import os
import sqlite3
import urllib.parse
import warnings
import zlib
from typing import Optional

import numpy as np

from fedjax_lab.data.federated import FederatedArrays, from_client_lists, split_clients
from fedjax_lab.data.leaf import SHAKESPEARE_CLASSES, char_ids, next_token_windows

TASKS = ("emnist", "shakespeare", "stackoverflow", "cifar100", "arrays")
FEATURES = {"emnist": ("pixels", "label"), "shakespeare": ("snippets",),
            "stackoverflow": ("tokens",), "cifar100": ("image", "label"), "arrays": ("x", "y")}
PAD, BOS, EOS = 0, 1, 2


# ---------------------------------------------------------------------------------------------
# Blob decoding (FedJAX's msgpack scheme).

def _ndarray(data):
    import msgpack
    shape, dtype_name, buf = msgpack.unpackb(data, raw=True)
    dtype_name = dtype_name.decode() if isinstance(dtype_name, bytes) else dtype_name
    return np.frombuffer(buf, dtype=np.dtype(dtype_name)).reshape(shape)


def _ext_hook(code, data):
    import msgpack
    if code == 1:
        return _ndarray(data)
    if code == 3:
        return _ndarray(data)[()]
    if code == 4:
        shape, flat = msgpack.unpackb(data, raw=True)
        out = np.empty(len(flat), dtype=object)
        out[:] = flat
        return out.reshape(shape)
    if code == 2:
        re_im = msgpack.unpackb(data)
        return complex(re_im[0], re_im[1])
    raise ValueError(f"sqlite: unknown msgpack extension type {code} in a client blob")


def decode_examples(blob: bytes) -> dict:
    """One client's `data` blob -> {feature: np.ndarray}."""
    import msgpack
    return msgpack.unpackb(zlib.decompress(blob), ext_hook=_ext_hook, raw=False)


SQLITE_FORMAT = ("expected a FedJAX SQLite file: table federated_data(client_id, data, "
                 "num_examples), data = zlib-compressed msgpack of {feature: ndarray} "
                 "(see fedjax_lab.data.sqlite)")


def read_clients(path: str, *, max_clients: Optional[int] = None):
    """[(client_id, {feature: array})] in rowid order."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"sqlite:{path}: file does not exist; {SQLITE_FORMAT}")
    # quoted, so that '?', '#' or '%' in a file name cannot turn into URI parameters
    uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"
    try:
        con = sqlite3.connect(uri, uri=True)
        try:
            q = "SELECT client_id, data, num_examples FROM federated_data ORDER BY rowid"
            if max_clients is not None:
                q += f" LIMIT {int(max_clients)}"
            rows = con.execute(q).fetchall()
        finally:
            con.close()
    except sqlite3.DatabaseError as err:      # "file is not a database", "no such table", ...
        raise ValueError(f"sqlite:{path}: is not a FedJAX SQLite dataset (sqlite said: {err}); "
                         f"{SQLITE_FORMAT}") from err
    out = []
    for cid, blob, n in rows:
        try:
            ex = decode_examples(blob)
            if not isinstance(ex, dict) or not all(isinstance(v, np.ndarray) and v.ndim
                                                   for v in ex.values()):
                raise ValueError("it decodes to something other than {feature: [n, ...] array}")
        except ImportError:
            raise
        except Exception as err:   # zlib.error, msgpack's errors (not all ValueError), TypeError
            why = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
            raise ValueError(f"sqlite:{path}: client {cid!r}: could not decode its data blob "
                             f"({why}); {SQLITE_FORMAT}") from err
        sizes = {k: len(v) for k, v in ex.items()}
        if any(s != n for s in sizes.values()):
            raise ValueError(f"sqlite:{path}: client {cid!r} says num_examples={n} but its "
                             f"features have lengths {sizes}")
        out.append((cid, ex))
    return out


def _check_features(path, clients, task):
    for cid, ex in clients:
        missing = [k for k in FEATURES[task] if k not in ex]
        if missing:
            raise ValueError(f"sqlite:{path}: client {cid!r} lacks features {missing} of task "
                             f"{task!r} (it has {sorted(ex)}); expected {list(FEATURES[task])}")


def infer_task(features) -> str:
    keys = set(features)
    if {"pixels", "label"} <= keys:
        return "emnist"
    if "snippets" in keys:
        return "shakespeare"
    if "tokens" in keys:
        return "stackoverflow"
    if {"image", "label"} <= keys:
        return "cifar100"
    if {"x", "y"} <= keys:
        return "arrays"
    raise ValueError(f"sqlite: cannot infer the task from features {sorted(keys)}; pass task= one of "
                     f"{list(TASKS)}")


def _default_test_path(path):
    d, f = os.path.split(path)
    if "train" not in f:
        return None
    i = f.rfind("train")
    cand = os.path.join(d, f[:i] + "test" + f[i + len("train"):])
    return cand if os.path.isfile(cand) else None


def _read_vocab(vocab_path, size):
    words = []
    with open(vocab_path) as fh:
        for line in fh:
            parts = line.split()
            if parts:
                words.append(parts[0])
            if len(words) == size:
                break
    return words


def _decode(v):
    return v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v)


class _Converter:
    def __init__(self, task, train_clients, path, *, seq_len, vocab, vocab_size, num_classes):
        self.task, self.seq_len = task, seq_len
        self.num_classes = num_classes
        if task == "emnist" and num_classes is None:
            self.num_classes = 10 if "digitsonly" in os.path.basename(path) else 62
        elif task == "shakespeare":
            self.num_classes = SHAKESPEARE_CLASSES
        elif task == "cifar100" and num_classes is None:
            self.num_classes = 100
        if task == "stackoverflow":
            if vocab is not None:
                words = _read_vocab(vocab, vocab_size)
            else:
                from fedjax_lab.data.leaf import build_vocab
                words = build_vocab((_decode(t).split() for _, ex in train_clients
                                     for t in ex["tokens"]), vocab_size)
            self.table = {w: i + 3 for i, w in enumerate(words)}
            self.oov = len(words) + 3
            self.num_classes = len(words) + 4
        if task == "cifar100":
            imgs = np.concatenate([ex["image"] for _, ex in train_clients]).astype(np.float64) / 255
            self.mean = imgs.mean(axis=(0, 1, 2)).astype(np.float32)
            self.std = imgs.std(axis=(0, 1, 2)).astype(np.float32) + 1e-8

    def __call__(self, ex):
        t = self.task
        if t == "emnist":
            return (1.0 - np.asarray(ex["pixels"], np.float32))[..., None], np.asarray(ex["label"])
        if t == "cifar100":
            x = (np.asarray(ex["image"], np.float32) / 255.0 - self.mean) / self.std
            return x, np.asarray(ex["label"])
        if t == "arrays":
            return np.asarray(ex["x"]), np.asarray(ex["y"])
        if t == "shakespeare":
            text = "\n".join(v.decode("latin-1") if isinstance(v, bytes) else str(v)
                             for v in ex["snippets"])
            return next_token_windows(char_ids(text), [0], self.seq_len, min_context=self.seq_len)
        if t == "stackoverflow":
            seqs = [[BOS] + [self.table.get(w, self.oov) for w in _decode(p).split()] + [EOS]
                    for p in ex["tokens"]]
            lengths = np.asarray([len(s) for s in seqs], np.int64)
            flat = np.concatenate([np.asarray(s, np.int32) for s in seqs]) if seqs else []
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if seqs else [0]
            return next_token_windows(flat, starts, self.seq_len, pad_id=PAD, min_context=1)
        raise AssertionError(t)


def load_sqlite(path, *, test_path: Optional[str] = None, task: Optional[str] = None,
                test_fraction: float = 0.2, seed: int = 0, max_clients: Optional[int] = None,
                seq_len: Optional[int] = None, vocab: Optional[str] = None, vocab_size: int = 10000,
                num_classes: Optional[int] = None) -> FederatedArrays:
    """Load a FedJAX SQLite file (and its test file) as FederatedArrays, one client per row."""
    path = os.path.expanduser(str(path))
    if task is not None and task not in TASKS:
        raise ValueError(f"sqlite: unknown task {task!r}; valid tasks: {list(TASKS)}")
    if max_clients is not None and max_clients <= 0:
        raise ValueError(f"max_clients must be > 0, got {max_clients}")
    if seq_len is not None and seq_len <= 0:
        raise ValueError(f"seq_len must be > 0, got {seq_len}")
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be > 0, got {vocab_size}")
    train = read_clients(path, max_clients=max_clients)
    if not train:
        raise ValueError(f"sqlite:{path}: holds no clients")
    task = task or infer_task(train[0][1])
    _check_features(path, train, task)
    if seq_len is None:
        seq_len = {"shakespeare": 80, "stackoverflow": 20}.get(task, 0)
    conv = _Converter(task, train, path, seq_len=seq_len, vocab=vocab, vocab_size=vocab_size,
                      num_classes=num_classes)
    ids = [cid for cid, _ in train]
    xs, ys = map(list, zip(*(conv(ex) for _, ex in train)))
    keep = [i for i, y in enumerate(ys) if len(y)]
    if len(keep) < len(ids):
        warnings.warn(f"sqlite: {len(ids) - len(keep)} clients have no {task} examples and are "
                      f"dropped (e.g. {[ids[i] for i in range(len(ids)) if i not in keep][:3]})")
        ids, xs, ys = [ids[i] for i in keep], [xs[i] for i in keep], [ys[i] for i in keep]
    if not ids:
        raise ValueError(f"sqlite:{path}: no client has a {task} example")
    ncls = conv.num_classes
    test_path = test_path or _default_test_path(path)
    if test_path is None:
        if ncls is None:
            ncls = int(max(int(y.max()) for y in ys)) + 1
        owner = np.repeat(np.arange(len(ids)), [len(y) for y in ys])
        return split_clients(np.concatenate(xs), np.concatenate(ys), owner, len(ids),
                             test_fraction=test_fraction, seed=seed, num_classes=ncls)
    test_path = os.path.expanduser(test_path)
    test = read_clients(test_path)
    _check_features(test_path, test, task)
    test = dict(test)
    empty = {k: v[:0] for k, v in train[0][1].items()}
    txs, tys = map(list, zip(*(conv(test.get(cid, empty)) for cid in ids)))
    for i, (tx, x) in enumerate(zip(txs, xs)):
        if tx.shape[0] == 0:
            txs[i] = np.zeros((0,) + x.shape[1:], x.dtype)
    if ncls is None:
        ncls = int(max(int(y.max()) for y in ys + tys if len(y))) + 1
    return from_client_lists(xs, ys, test_xs=txs, test_ys=tys, num_classes=ncls)
