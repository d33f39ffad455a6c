"""LEAF benchmark JSON (Caldas et al., "LEAF: A Benchmark for Federated Settings", 2018), with the
users' client structure kept.

Format (github.com/TalwalkarLab/leaf, `data/<name>/data/{train,test}/*.json`): each file holds
    {"users": [u, ...], "num_samples": [n_u, ...], "user_data": {u: {"x": [...], "y": [...]}}}
(and sometimes "hierarchies"). A user may be spread over several files; LEAF's train/test split
("--tf") keeps the same users in both directories, so client k's test split is its examples in
`test/`. Users found only in `test/` have no training data and are dropped (with a warning).
Without a test directory (LEAF's `all_data/`, or a single JSON file), each client holds out
`test_fraction` of its examples. A file that is not in this format raises ValueError naming it.

Tasks, inferred from the examples (or forced with `task=`):
  femnist     x: 784 floats in [0, 1] (LEAF's pixels, background 1.0) -> [n, 28, 28, 1], 62 classes.
  shakespeare x: 80-char strings, y: the next char -> int ids [n, 80], y: id of the next char.
              LEAF's 80-character vocabulary (`SHAKESPEARE_VOCAB`, order as in LEAF's
              `language_utils.ALL_LETTERS`); LEAF maps unknown chars to index -1, we map them to an
              extra OOV id 80, so num_classes = 81.
  sent140     x: LEAF's raw tweet record, text at index 4; y: 0/1 (LEAF's '0'/'4' also accepted).
              Words are split as LEAF does (`[\\w']+|[.,!?;]`), truncated/padded to `max_words=25`.
              LEAF looks words up in GloVe's 400k vocabulary; offline we use the `vocab_size` most
              frequent training words instead (ids: 0 PAD, 1 OOV, words from 2).
  celeba      x: image file names, y: 0/1 (smiling). Images are read from `image_dir` (default
              `<root>/raw/img_align_celeba`, as LEAF's preprocessing places them), resized to
              84x84 RGB as in LEAF's model, scaled to [0, 1].
  synthetic   any other numeric vectors (LEAF's Synthetic): x float32 [n, d], y int.

The tokenizer helpers here (`char_ids`, `next_token_windows`, `split_words`, `build_vocab`) are
shared with the FedJAX SQLite loader.
"""
from __future__ import annotations

import collections
import glob
import json
import os
import re
import warnings
from typing import Optional, Sequence

import numpy as np

from fedjax_lab.data.federated import FederatedArrays, from_client_lists, split_clients

TASKS = ("femnist", "shakespeare", "sent140", "celeba", "synthetic")
SHAKESPEARE_VOCAB = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
SHAKESPEARE_OOV = len(SHAKESPEARE_VOCAB)       # 80
SHAKESPEARE_CLASSES = len(SHAKESPEARE_VOCAB) + 1
SHAKESPEARE_SEQ_LEN = 80                        # LEAF's context length
_CHAR_TABLE = np.full(256, SHAKESPEARE_OOV, np.int32)
for _i, _c in enumerate(SHAKESPEARE_VOCAB):
    _CHAR_TABLE[ord(_c)] = _i
_IMAGE_EXT = (".jpg", ".jpeg", ".png", ".bmp")
_WORD_RE = re.compile(r"[\w']+|[.,!?;]")


# ---------------------------------------------------------------------------------------------
# Tokenizers (shared with data.sqlite).

def char_ids(text: str) -> np.ndarray:
    """Characters -> ids in LEAF's 80-char vocabulary; anything else -> SHAKESPEARE_OOV."""
    codes = np.frombuffer(text.encode("utf-32-le"), np.uint32) if text else np.zeros(0, np.uint32)
    return np.where(codes < 256, _CHAR_TABLE[np.minimum(codes, 255)], SHAKESPEARE_OOV).astype(np.int32)


def next_token_windows(tokens, segment_starts, seq_len: int, *, pad_id: int = 0,
                       min_context: int = 1):
    """Next-token examples from a flat token array cut into segments (posts, or whole texts).

    For every position p with at least `min_context` earlier tokens in its own segment:
    x = the `seq_len` tokens before p (positions before the segment start are `pad_id`, so the
    context is left-padded), y = tokens[p]. Returns (x int32 [m, seq_len], y int32 [m]).
    """
    tokens = np.asarray(tokens, np.int32)
    starts = np.asarray(segment_starts, np.int64)
    if tokens.size == 0:
        return np.zeros((0, seq_len), np.int32), np.zeros((0,), np.int32)
    seg = np.searchsorted(starts, np.arange(tokens.shape[0]), side="right") - 1
    start_of = starts[seg]
    pos = np.flatnonzero(np.arange(tokens.shape[0]) - start_of >= min_context)
    idx = pos[:, None] - seq_len + np.arange(seq_len)[None, :]
    valid = idx >= start_of[pos][:, None]
    x = np.where(valid, tokens[np.maximum(idx, 0)], pad_id).astype(np.int32)
    return x, tokens[pos]


def split_words(line: str) -> list:
    """LEAF's word split for Sent140: runs of word characters/apostrophes, and . , ! ? ; alone."""
    return _WORD_RE.findall(line)


def build_vocab(word_lists, size: int) -> list:
    """The `size` most frequent words (ties broken alphabetically, so the result is deterministic)."""
    if size <= 0:
        raise ValueError(f"vocab_size must be > 0, got {size}")
    counts = collections.Counter()
    for words in word_lists:
        counts.update(words)
    return [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:size]]


# ---------------------------------------------------------------------------------------------
# Files.

def _json_files(d):
    return sorted(glob.glob(os.path.join(d, "*.json")))


def _resolve(path):
    """-> (train_files, test_files or None, root)."""
    path = os.path.expanduser(str(path))
    if os.path.isfile(path):
        return [path], None, os.path.dirname(os.path.dirname(os.path.abspath(path)))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"leaf: path {path!r} does not exist; give a LEAF dataset directory "
                                "(with data/train and data/test, or train/ and test/) or a JSON file")
    for base in (path, os.path.join(path, "data")):
        tr, te = os.path.join(base, "train"), os.path.join(base, "test")
        if os.path.isdir(tr) and _json_files(tr):
            test_files = _json_files(te) if os.path.isdir(te) else []
            return _json_files(tr), test_files or None, base
    for base in (path, os.path.join(path, "data", "all_data"), os.path.join(path, "all_data")):
        if os.path.isdir(base) and _json_files(base):
            return _json_files(base), None, os.path.dirname(base.rstrip(os.sep))
    raise FileNotFoundError(f"leaf: no LEAF JSON files under {path!r}: expected train/*.json and "
                            "test/*.json (or data/train, data/test, all_data/*.json)")


LEAF_FORMAT = ('expected a LEAF JSON file {"users": [u, ...], "num_samples": [n_u, ...], '
               '"user_data": {u: {"x": [...], "y": [...]}}} (see fedjax_lab.data.leaf)')


def _read_one(f):
    """One LEAF file -> (users, {user: {"x": list, "y": list}}, num_samples or None), checked."""
    try:
        with open(f, encoding="utf-8") as fh:
            blob = json.load(fh)
    except (OSError, ValueError) as err:      # JSONDecodeError and UnicodeDecodeError are both
        raise ValueError(f"leaf:{f}: could not read as JSON ({type(err).__name__}: {err}); "
                         f"{LEAF_FORMAT}") from err
    if not isinstance(blob, dict):
        raise ValueError(f"leaf:{f}: the JSON holds a {type(blob).__name__}, not an object; "
                         f"{LEAF_FORMAT}")
    for key in ("users", "user_data"):
        if key not in blob:
            raise ValueError(f"leaf:{f}: not a LEAF file: missing key {key!r}, found "
                             f"{sorted(blob)[:10]}; {LEAF_FORMAT}")
    users, user_data, num_samples = blob["users"], blob["user_data"], blob.get("num_samples")
    if not isinstance(users, list) or not isinstance(user_data, dict):
        raise ValueError(f"leaf:{f}: 'users' must be a list and 'user_data' an object, got "
                         f"{type(users).__name__} and {type(user_data).__name__}; {LEAF_FORMAT}")
    if num_samples is not None and (not isinstance(num_samples, list)
                                    or len(num_samples) != len(users)):
        raise ValueError(f"leaf:{f}: 'num_samples' must list one count per user ({len(users)}), "
                         f"got {str(num_samples)[:60]}; {LEAF_FORMAT}")
    for u in users:
        ud = user_data.get(u) if isinstance(u, str) else None   # JSON object keys are strings
        if not isinstance(ud, dict) or not isinstance(ud.get("x"), list) \
                or not isinstance(ud.get("y"), list):
            what = ("has no entry in 'user_data'" if ud is None else
                    f"has user_data {str(ud)[:60]!r}, not lists 'x' and 'y'")
            raise ValueError(f"leaf:{f}: user {u!r} {what}; {LEAF_FORMAT}")
    return users, user_data, num_samples


def read_leaf_json(files: Sequence[str]):
    """Merge LEAF files -> (users in first-seen order, {user: (x list, y list)})."""
    users, data = [], {}
    for f in files:
        file_users, user_data, num_samples = _read_one(f)
        for i, u in enumerate(file_users):
            ud = user_data[u]
            if len(ud["x"]) != len(ud["y"]):
                raise ValueError(f"leaf:{f}: user {u!r} has {len(ud['x'])} x and {len(ud['y'])} y")
            if num_samples is not None and num_samples[i] != len(ud["y"]):
                raise ValueError(f"leaf:{f}: num_samples[{i}] = {num_samples[i]} but user {u!r} "
                                 f"has {len(ud['y'])} examples")
            if u not in data:
                users.append(u)
                data[u] = ([], [])
            data[u][0].extend(ud["x"])
            data[u][1].extend(ud["y"])
    return users, data


def infer_task(x0, y0) -> str:
    if isinstance(x0, str):
        if x0.lower().endswith(_IMAGE_EXT):
            return "celeba"
        if isinstance(y0, str) and len(y0) == 1:
            return "shakespeare"
    if isinstance(x0, (list, tuple)) and x0:
        if any(isinstance(v, str) for v in x0):
            return "sent140"
        flat = np.asarray(x0, dtype=np.float64).ravel()
        return "femnist" if flat.size == 784 else "synthetic"
    raise ValueError(f"leaf: cannot infer the task from an example x={str(x0)[:60]!r}, y={y0!r}; "
                     f"pass task= one of {list(TASKS)}")


class _Converter:
    """Per-task conversion of one client's raw (x list, y list) to arrays; fitted on train."""

    def __init__(self, task, train_data, *, max_words, vocab_size, image_dir, image_size):
        self.task, self.max_words, self.image_dir, self.image_size = (task, max_words, image_dir,
                                                                      image_size)
        self.vocab = None
        if task == "sent140":
            words = (split_words(r[4] if len(r) > 4 else r[-1]) for xs, _ in train_data.values()
                     for r in xs)
            self.vocab = {w: i + 2 for i, w in enumerate(build_vocab(words, vocab_size))}

    def feature_shape(self, dim=None):
        return {"femnist": (28, 28, 1), "shakespeare": (SHAKESPEARE_SEQ_LEN,),
                "sent140": (self.max_words,), "celeba": (self.image_size, self.image_size, 3),
                "synthetic": (dim,) if dim else (0,)}[self.task]

    def __call__(self, xs, ys, dim):
        if not ys:
            dtype = np.int32 if self.task in ("shakespeare", "sent140") else np.float32
            return np.zeros((0,) + self.feature_shape(dim), dtype), np.zeros((0,), np.int32)
        t = self.task
        if t == "femnist":
            x = np.asarray(xs, np.float32).reshape(-1, 28, 28, 1)
            return x, np.asarray(ys, np.int32)
        if t == "synthetic":
            return np.asarray(xs, np.float32).reshape(len(xs), -1), np.asarray(ys, np.int32)
        if t == "shakespeare":
            x = np.stack([char_ids(s) for s in xs])
            return x, np.concatenate([char_ids(c) for c in ys])
        if t == "sent140":
            x = np.zeros((len(xs), self.max_words), np.int32)
            for i, r in enumerate(xs):
                text = r[4] if len(r) > 4 else r[-1]
                ids = [self.vocab.get(w, 1) for w in split_words(text)[:self.max_words]]
                x[i, :len(ids)] = ids
            y = np.asarray([1 if str(v) in ("1", "4") else 0 for v in ys], np.int32)
            return x, y
        if t == "celeba":
            return (np.stack([self._image(f) for f in xs]),
                    np.asarray([int(v) for v in ys], np.int32))
        raise AssertionError(t)

    def _image(self, name):
        from PIL import Image
        f = os.path.join(self.image_dir, name)
        if not os.path.isfile(f):
            raise FileNotFoundError(f"leaf celeba: image {f!r} not found; pass image_dir= the folder "
                                    "holding img_align_celeba's files")
        try:
            with Image.open(f) as img:
                img = img.resize((self.image_size, self.image_size)).convert("RGB")
        except (OSError, ValueError) as err:      # PIL's UnidentifiedImageError is an OSError
            raise ValueError(f"leaf celeba: could not read image {f!r} ({type(err).__name__}: "
                             f"{err}); expected a JPEG/PNG as in img_align_celeba") from err
        return np.asarray(img, np.float32) / 255.0


def load_leaf(path, *, task: Optional[str] = None, test_fraction: float = 0.2, seed: int = 0,
              max_clients: Optional[int] = None, max_words: int = 25, vocab_size: int = 10000,
              image_dir: Optional[str] = None, image_size: int = 84) -> FederatedArrays:
    """Load a LEAF dataset directory (or JSON file) as FederatedArrays, one client per LEAF user."""
    if task is not None and task not in TASKS:
        raise ValueError(f"leaf: unknown task {task!r}; valid tasks: {list(TASKS)}")
    if max_clients is not None and max_clients <= 0:
        raise ValueError(f"max_clients must be > 0, got {max_clients}")
    train_files, test_files, root = _resolve(path)
    users, train = read_leaf_json(train_files)
    if max_clients is not None:
        users = users[:max_clients]
    if not users:
        raise ValueError(f"leaf: no users in {train_files}")
    first = next((u for u in users if train[u][1]), None)
    if first is None:
        raise ValueError("leaf: every user has zero training examples")
    if task is None:
        task = infer_task(train[first][0][0], train[first][1][0])
    if task == "celeba" and image_dir is None:
        image_dir = next((d for d in (os.path.join(root, "raw", "img_align_celeba"),
                                      os.path.join(root, "data", "raw", "img_align_celeba"),
                                      os.path.join(os.path.dirname(root), "raw", "img_align_celeba"))
                          if os.path.isdir(d)), os.path.join(root, "raw", "img_align_celeba"))
    conv = _Converter(task, {u: train[u] for u in users}, max_words=max_words,
                      vocab_size=vocab_size, image_dir=image_dir, image_size=image_size)
    dim = (len(np.asarray(train[first][0][0]).ravel()) if task == "synthetic" else None)
    num_classes = {"femnist": 62, "shakespeare": SHAKESPEARE_CLASSES, "sent140": 2,
                   "celeba": 2}.get(task)
    xs, ys = zip(*(conv(*train[u], dim) for u in users))
    if test_files is None:
        owner = np.repeat(np.arange(len(users)), [len(v) for v in ys])
        if num_classes is None:
            num_classes = int(max(int(v.max()) for v in ys if v.size)) + 1
        return split_clients(np.concatenate(xs), np.concatenate(ys), owner, len(users),
                             test_fraction=test_fraction, seed=seed, num_classes=num_classes)
    test_users, test = read_leaf_json(test_files)
    missing = [u for u in test_users if u not in train]
    if missing:
        warnings.warn(f"leaf: {len(missing)} users appear only in the test files and are dropped "
                      f"(e.g. {missing[:3]}); LEAF's sample-based split keeps users in both")
    txs, tys = zip(*(conv(*test.get(u, ([], [])), dim) for u in users))
    return from_client_lists(list(xs), list(ys), test_xs=list(txs), test_ys=list(tys),
                             num_classes=num_classes)
