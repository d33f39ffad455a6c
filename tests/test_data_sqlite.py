"""FedJAX SQLite: small files written here in FedJAX's format (table federated_data; zlib-compressed
msgpack with extension types 1 = ndarray (shape, dtype name, bytes) and 4 = bytes array
(shape, flat list)), loaded back."""
import re
import sqlite3
import zlib

import msgpack
import numpy as np
import pytest

from fedjax_lab.data.leaf import SHAKESPEARE_OOV, SHAKESPEARE_VOCAB
from fedjax_lab.data.sqlite import decode_examples, load_sqlite


def _pack(obj):
    if isinstance(obj, np.ndarray) and obj.dtype == object:
        return msgpack.ExtType(4, msgpack.packb((list(obj.shape), list(obj.ravel())),
                                                use_bin_type=True))
    if isinstance(obj, np.ndarray):
        return msgpack.ExtType(1, msgpack.packb((list(obj.shape), obj.dtype.name,
                                                 obj.tobytes("C")), use_bin_type=True))
    raise TypeError(type(obj))


def write_fedjax_sqlite(path, clients):
    """clients: [(client_id bytes, {feature: ndarray})], written in this (rowid) order."""
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE federated_data (client_id BLOB NOT NULL PRIMARY KEY, "
                "data BLOB NOT NULL, num_examples INTEGER NOT NULL);")
    for cid, ex in clients:
        blob = zlib.compress(msgpack.packb(ex, default=_pack, strict_types=True))
        n = len(next(iter(ex.values())))
        con.execute("INSERT INTO federated_data VALUES (?, ?, ?)", (cid, blob, n))
    con.commit()
    con.close()


def _emnist_client(rng, n):
    return {"pixels": rng.random((n, 28, 28)).astype(np.float32),
            "label": rng.integers(0, 62, n).astype(np.int32)}


def test_decode_matches_written_arrays():
    ex = {"a": np.arange(6, dtype=np.int16).reshape(2, 3),
          "b": np.array([b"x y", b"z"], dtype=object)}
    out = decode_examples(zlib.compress(msgpack.packb(ex, default=_pack, strict_types=True)))
    np.testing.assert_array_equal(out["a"], ex["a"])
    assert out["a"].dtype == np.int16 and list(out["b"]) == [b"x y", b"z"]


def test_emnist_train_and_test_files_keep_clients_in_rowid_order(tmp_path):
    rng = np.random.default_rng(0)
    ids = [b"f0931_42", b"f0100_10", b"f2201_03"]          # not sorted: rowid order must win
    train = [(c, _emnist_client(rng, n)) for c, n in zip(ids, (4, 2, 5))]
    test = [(c, _emnist_client(rng, n)) for c, n in zip((ids[2], ids[0]), (3, 1))]
    write_fedjax_sqlite(str(tmp_path / "federated_emnist_train.sqlite"), train)
    write_fedjax_sqlite(str(tmp_path / "federated_emnist_test.sqlite"), test)
    d = load_sqlite(str(tmp_path / "federated_emnist_train.sqlite"))
    assert d.num_clients == 3 and d.num_classes == 62 and d.x.shape[1:] == (28, 28, 1)
    for k, (_, ex) in enumerate(train):
        x, y = d.client(k)
        np.testing.assert_allclose(np.asarray(x)[..., 0], 1.0 - ex["pixels"], atol=1e-7)
        np.testing.assert_array_equal(np.asarray(y), ex["label"])
    np.testing.assert_array_equal(np.asarray(d.test.client_sizes), [1, 0, 3])
    np.testing.assert_allclose(np.asarray(d.test.client(2)[0])[..., 0], 1.0 - test[0][1]["pixels"],
                               atol=1e-7)
    from fedjax_lab.data import load
    d2 = load(f"sqlite:{tmp_path}/federated_emnist_train.sqlite,max_clients=2")
    assert d2.num_clients == 2


def test_digitsonly_file_has_10_classes_and_holdout_without_test_file(tmp_path):
    rng = np.random.default_rng(1)
    clients = [(b"a", {"pixels": rng.random((10, 28, 28)).astype(np.float32),
                       "label": rng.integers(0, 10, 10).astype(np.int32)})]
    path = str(tmp_path / "federated_emnist_digitsonly_train.sqlite")
    write_fedjax_sqlite(path, clients)
    d = load_sqlite(path, test_fraction=0.3)
    assert d.num_classes == 10
    assert (d.num_examples, d.test.num_examples) == (7, 3)


def test_shakespeare_snippets_to_leaf_next_char(tmp_path):
    text_a = [b"ROMEO. But soft, what light through yonder window breaks?",
              b"It is the east, and Juliet is the sun~"]
    clients = [(b"ROMEO", {"snippets": np.array(text_a, dtype=object)}),
               (b"SHORT", {"snippets": np.array([b"Ay."], dtype=object)})]
    write_fedjax_sqlite(str(tmp_path / "shakespeare_train.sqlite"), clients)
    with pytest.warns(UserWarning, match="1 clients have no shakespeare examples"):
        d = load_sqlite(str(tmp_path / "shakespeare_train.sqlite"), seq_len=10, test_fraction=0.0)
    joined = "\n".join(s.decode() for s in text_a)
    ids = [SHAKESPEARE_VOCAB.find(c) if c in SHAKESPEARE_VOCAB else SHAKESPEARE_OOV for c in joined]
    ref_x = [ids[p - 10:p] for p in range(10, len(ids))]     # LEAF: every full 10-char window
    ref_y = ids[10:]
    assert d.num_clients == 1 and d.num_classes == 81
    # held-out splitting shuffles a client's examples: compare (x, y) rows as sets
    got = np.concatenate([np.asarray(d.x), np.asarray(d.y)[:, None]], 1)
    ref = np.concatenate([np.asarray(ref_x), np.asarray(ref_y)[:, None]], 1)
    np.testing.assert_array_equal(got[np.lexsort(got.T[::-1])], ref[np.lexsort(ref.T[::-1])])


def test_stackoverflow_vocab_and_next_word_windows(tmp_path):
    posts_a = np.array([b"how do i sort a list", b"sort it"], dtype=object)
    posts_b = np.array([b"a list of lists"], dtype=object)
    clients = [(b"1", {"tokens": posts_a, "type": np.array([b"question", b"answer"], dtype=object)}),
               (b"2", {"tokens": posts_b, "type": np.array([b"answer"], dtype=object)})]
    write_fedjax_sqlite(str(tmp_path / "stackoverflow_train.sqlite"), clients)
    write_fedjax_sqlite(str(tmp_path / "stackoverflow_test.sqlite"),
                        [(b"2", {"tokens": np.array([b"sort lists quickly"], dtype=object),
                                 "type": np.array([b"answer"], dtype=object)})])
    d = load_sqlite(str(tmp_path / "stackoverflow_train.sqlite"), seq_len=3, vocab_size=3)
    # counts: a 2, list 2, sort 2, ... -> vocab [a, list, sort] -> ids 3, 4, 5; OOV 6; PAD 0 BOS 1 EOS 2
    assert d.num_classes == 7
    seq = [1, 6, 6, 6, 5, 3, 4, 2]                # BOS how do i sort a list EOS
    ref = [([0] * 3 + seq)[p:p + 3] for p in range(1, len(seq))]
    ref_y = seq[1:]
    seq2 = [1, 5, 6, 2]                           # BOS sort it EOS
    ref += [([0] * 3 + seq2)[p:p + 3] for p in range(1, len(seq2))]
    ref_y += seq2[1:]
    x0, y0 = d.client(0)
    np.testing.assert_array_equal(np.asarray(x0), ref)
    np.testing.assert_array_equal(np.asarray(y0), ref_y)
    np.testing.assert_array_equal(np.asarray(d.test.client_sizes), [0, 4])
    np.testing.assert_array_equal(np.asarray(d.test.y), [5, 6, 6, 2])   # sort lists quickly EOS
    # a FedJAX-style word-count file fixes the vocabulary instead
    (tmp_path / "so.word_count").write_text("list 100\nsort 50\nhow 10\n")
    d2 = load_sqlite(str(tmp_path / "stackoverflow_train.sqlite"), seq_len=3, vocab_size=2,
                     vocab=str(tmp_path / "so.word_count"))
    assert d2.num_classes == 6
    np.testing.assert_array_equal(np.asarray(d2.client(1)[1]), [5, 3, 5, 5, 2])  # a list of lists EOS


def test_generic_arrays_task(tmp_path):
    rng = np.random.default_rng(2)
    clients = [(str(i).encode(), {"x": rng.normal(size=(5, 3)).astype(np.float32),
                                  "y": rng.integers(0, 4, 5).astype(np.int64)}) for i in range(3)]
    write_fedjax_sqlite(str(tmp_path / "mine.sqlite"), clients)
    d = load_sqlite(str(tmp_path / "mine.sqlite"), test_fraction=0.2)
    assert d.num_clients == 3
    assert d.num_examples + d.test.num_examples == 15


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_sqlite(str(tmp_path / "nope.sqlite"))
    con = sqlite3.connect(str(tmp_path / "other.sqlite"))
    con.execute("CREATE TABLE t (a INTEGER)")
    con.close()
    with pytest.raises(ValueError, match="not a FedJAX SQLite dataset"):
        load_sqlite(str(tmp_path / "other.sqlite"))
    con = sqlite3.connect(str(tmp_path / "lie.sqlite"))
    con.execute("CREATE TABLE federated_data (client_id BLOB, data BLOB, num_examples INTEGER)")
    blob = zlib.compress(msgpack.packb({"x": np.zeros((2, 1), np.float32),
                                        "y": np.zeros(2, np.int32)}, default=_pack))
    con.execute("INSERT INTO federated_data VALUES (?, ?, ?)", (b"c", blob, 5))
    con.commit()
    con.close()
    with pytest.raises(ValueError, match="num_examples=5"):
        load_sqlite(str(tmp_path / "lie.sqlite"))
    with pytest.raises(ValueError, match="unknown task 'emnist62'; valid tasks"):
        load_sqlite(str(tmp_path / "lie.sqlite"), task="emnist62")
    with pytest.raises(ValueError, match="seq_len must be > 0"):
        load_sqlite(str(tmp_path / "lie.sqlite"), seq_len=0)


def _one_row(path, blob):
    con = sqlite3.connect(str(path))
    con.execute("CREATE TABLE federated_data (client_id BLOB, data BLOB, num_examples INTEGER)")
    con.execute("INSERT INTO federated_data VALUES (?, ?, ?)", (b"c0", blob, 2))
    con.commit()
    con.close()


@pytest.mark.parametrize("kind, why", [
    ("random bytes", r"is not a FedJAX SQLite dataset \(sqlite said: file is not a database\)"),
    ("no such column", r"is not a FedJAX SQLite dataset \(sqlite said: no such column"),
    ("blob not zlib", r"client b'c0': could not decode its data blob \(error: "),
    ("zlib of garbage", r"client b'c0': could not decode its data blob"),
    ("msgpack of a list", r"client b'c0': could not decode its data blob .*something other than"),
])
def test_corrupt_file_names_the_file_and_the_format(tmp_path, kind, why):
    path = tmp_path / "federated_emnist_train.sqlite"
    if kind == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "no such column":
        con = sqlite3.connect(str(path))
        con.execute("CREATE TABLE federated_data (client_id BLOB, data BLOB)")
        con.close()
    else:
        _one_row(path, {"blob not zlib": b"garbage",
                        "zlib of garbage": zlib.compress(b"\xc1\xc1\xc1"),
                        "msgpack of a list": zlib.compress(msgpack.packb([1, 2]))}[kind])
    match = re.escape(f"sqlite:{path}: ") + why + ".*expected a FedJAX SQLite file: table " \
        r"federated_data\(client_id, data, num_examples\)"
    with pytest.raises(ValueError, match=match):
        load_sqlite(str(path))
    from fedjax_lab.data import load
    with pytest.raises(ValueError, match=match):
        load(f"sqlite:{path}")


def test_forced_task_with_missing_features_names_the_file(tmp_path):
    rng = np.random.default_rng(0)
    write_fedjax_sqlite(str(tmp_path / "a_train.sqlite"), [(b"c", _emnist_client(rng, 3))])
    write_fedjax_sqlite(str(tmp_path / "a_test.sqlite"),
                        [(b"c", {"x": np.zeros((1, 2), np.float32), "y": np.zeros(1, np.int32)})])
    with pytest.raises(ValueError, match=re.escape(
            f"sqlite:{tmp_path / 'a_train.sqlite'}: client b'c' lacks features ['image'] of task "
            "'cifar100'")):
        load_sqlite(str(tmp_path / "a_train.sqlite"), task="cifar100")
    with pytest.raises(ValueError, match=re.escape(f"sqlite:{tmp_path / 'a_test.sqlite'}: client "
                                                   "b'c' lacks features ['pixels', 'label']")):
        load_sqlite(str(tmp_path / "a_train.sqlite"))


def test_file_name_with_uri_characters_is_opened_read_only(tmp_path):
    # sqlite reads '?' and '#' in a file: URI as query and fragment; they must stay in the name
    path = tmp_path / "a#b?c%41.sqlite"
    rng = np.random.default_rng(0)
    write_fedjax_sqlite(str(path), [(b"c", _emnist_client(rng, 3))])
    d = load_sqlite(str(path))
    assert d.num_examples + d.test.num_examples == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]   # no stray file "a" created
