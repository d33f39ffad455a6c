"""LEAF JSON: small files of each task, written here in LEAF's layout, loaded back."""
import json
import os
import re

import numpy as np
import pytest

from fedjax_lab.data import leaf
from fedjax_lab.data.leaf import (SHAKESPEARE_OOV, SHAKESPEARE_VOCAB, load_leaf,
                                  next_token_windows)


def write_leaf(path, users_data):
    """users_data: {user: (x list, y list)} -> one LEAF JSON file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    blob = {"users": list(users_data), "num_samples": [len(v[1]) for v in users_data.values()],
            "user_data": {u: {"x": x, "y": y} for u, (x, y) in users_data.items()}}
    with open(path, "w") as f:
        json.dump(blob, f)


def _femnist_user(rng, n):
    return (rng.random((n, 784)).round(3).tolist(), rng.integers(0, 62, n).tolist())


@pytest.fixture
def femnist_dir(tmp_path):
    rng = np.random.default_rng(0)
    users = {u: _femnist_user(rng, n) for u, n in (("f0001", 5), ("f0002", 3), ("f0003", 7))}
    tests = {u: _femnist_user(rng, n) for u, n in (("f0001", 2), ("f0003", 1), ("f9999", 4))}
    root = tmp_path / "femnist"
    # users spread over two train files, as LEAF writes them in chunks
    write_leaf(str(root / "data/train/all_data_0_train.json"),
               {u: users[u] for u in ("f0001", "f0002")})
    write_leaf(str(root / "data/train/all_data_1_train.json"), {"f0003": users["f0003"]})
    write_leaf(str(root / "data/test/all_data_0_test.json"), tests)
    return root, users, tests


def test_femnist_roundtrip_keeps_users_and_test_split(femnist_dir):
    root, users, tests = femnist_dir
    with pytest.warns(UserWarning, match="1 users appear only in the test files"):
        d = load_leaf(str(root))
    assert d.num_clients == 3 and d.num_classes == 62 and d.x.shape[1:] == (28, 28, 1)
    for k, u in enumerate(("f0001", "f0002", "f0003")):
        x, y = d.client(k)
        np.testing.assert_allclose(np.asarray(x).reshape(-1, 784), users[u][0], atol=1e-6)
        np.testing.assert_array_equal(np.asarray(y), users[u][1])
    np.testing.assert_array_equal(np.asarray(d.test.client_sizes), [2, 0, 1])
    np.testing.assert_allclose(np.asarray(d.test.client(2)[0]).reshape(-1, 784),
                               tests["f0003"][0], atol=1e-6)
    # the same through the spec string, and from the data/ directory itself
    from fedjax_lab.data import load
    with pytest.warns(UserWarning):
        d2 = load(f"leaf:{root}/data")
    np.testing.assert_array_equal(np.asarray(d2.x), np.asarray(d.x))


def test_single_file_holds_out_a_share_per_client(tmp_path):
    rng = np.random.default_rng(1)
    users = {f"u{i}": (rng.normal(size=(10 + i, 5)).tolist(), rng.integers(0, 3, 10 + i).tolist())
             for i in range(4)}
    f = tmp_path / "synthetic.json"
    write_leaf(str(f), users)
    d = load_leaf(str(f), test_fraction=0.3, seed=0)
    assert d.num_clients == 4 and d.x.shape[1:] == (5,) and d.num_classes == 3
    np.testing.assert_array_equal(np.asarray(d.client_sizes) + np.asarray(d.test.client_sizes),
                                  [10, 11, 12, 13])
    np.testing.assert_array_equal(np.asarray(d.test.client_sizes), [3, 3, 4, 4])
    for k in range(4):        # every example of user k is in client k's train or test split
        both = np.concatenate([np.asarray(d.client(k)[0]), np.asarray(d.test.client(k)[0])])
        ref = np.asarray(users[f"u{k}"][0], np.float32)
        np.testing.assert_allclose(np.sort(both, axis=0), np.sort(ref, axis=0), atol=1e-6)
    d2 = load_leaf(str(tmp_path), max_clients=2)   # a folder of JSON files (LEAF's all_data/)
    assert d2.num_clients == 2


def test_shakespeare_next_char_ids(tmp_path):
    text = "To be, or not to be: that is the question.\nWhether 'tis nobler in the mind~~~ to suffer"
    xs = [text[i:i + 80] for i in range(len(text) - 80)]
    ys = [text[i + 80] for i in range(len(text) - 80)]
    write_leaf(str(tmp_path / "data/train/t.json"), {"HAMLET": (xs[:4], ys[:4])})
    write_leaf(str(tmp_path / "data/test/t.json"), {"HAMLET": (xs[4:], ys[4:])})
    d = load_leaf(str(tmp_path))
    assert d.num_classes == 81 and d.x.shape == (4, 80) and d.x.dtype == np.int32
    ref = [[SHAKESPEARE_VOCAB.find(c) if c in SHAKESPEARE_VOCAB else SHAKESPEARE_OOV for c in s]
           for s in xs[:4]]
    np.testing.assert_array_equal(np.asarray(d.x), ref)
    np.testing.assert_array_equal(np.asarray(d.y), [SHAKESPEARE_VOCAB.find(c) for c in ys[:4]])
    assert SHAKESPEARE_OOV in np.asarray(d.x)          # '~' is not in LEAF's vocabulary
    assert len(SHAKESPEARE_VOCAB) == 80 and d.test.num_examples == len(xs) - 4


def test_sent140_words_vocab_and_labels(tmp_path):
    rec = lambda text: ["1467810369", "Mon Apr 06", "NO_QUERY", "user", text, ""]
    users = {"alice": ([rec("I love it, love it!"), rec("bad day")], ["4", "0"]),
             "bob": ([rec("love the rain; rain rain")], [4])}
    write_leaf(str(tmp_path / "data/train/s.json"), users)
    write_leaf(str(tmp_path / "data/test/s.json"), {"bob": ([rec("unknown words love")], ["0"])})
    d = load_leaf(str(tmp_path), max_words=6, vocab_size=3)
    assert d.num_classes == 2 and d.x.shape == (3, 6)
    # counts: love 3, rain 3, it 2, ',' 1, ... -> vocab [love, rain, it] -> ids 2, 3, 4; OOV 1, PAD 0
    np.testing.assert_array_equal(np.asarray(d.x), [[1, 2, 4, 1, 2, 4], [1, 1, 0, 0, 0, 0],
                                                   [2, 1, 3, 1, 3, 3]])
    np.testing.assert_array_equal(np.asarray(d.y), [1, 0, 1])
    np.testing.assert_array_equal(np.asarray(d.test.x), [[1, 1, 2, 0, 0, 0]])


def test_celeba_reads_and_resizes_images(tmp_path):
    from PIL import Image
    img_dir = tmp_path / "celeba/data/raw/img_align_celeba"
    img_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for i in range(3):
        a = rng.integers(0, 256, (20, 16, 3), dtype=np.uint8)
        Image.fromarray(a).save(img_dir / f"00000{i}.png")
        arrays[f"00000{i}.png"] = a
    write_leaf(str(tmp_path / "celeba/data/train/c.json"),
               {"7": (["000000.png", "000001.png"], [1, 0])})
    write_leaf(str(tmp_path / "celeba/data/test/c.json"), {"7": (["000002.png"], [1])})
    d = load_leaf(str(tmp_path / "celeba"), image_size=12)
    assert d.x.shape == (2, 12, 12, 3) and d.num_classes == 2
    ref = np.asarray(Image.fromarray(arrays["000001.png"]).resize((12, 12)), np.float32) / 255
    np.testing.assert_allclose(np.asarray(d.client(0)[0][1]), ref, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="image_dir"):
        load_leaf(str(tmp_path / "celeba"), image_dir=str(tmp_path))


def test_next_token_windows_matches_reference_loop():
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 50, 40)
    starts = [0, 7, 8, 25]
    for seq_len, min_context in ((5, 1), (4, 4), (12, 2)):
        x, y = next_token_windows(tokens, starts, seq_len, pad_id=0, min_context=min_context)
        ref_x, ref_y = [], []
        bounds = list(starts) + [len(tokens)]
        for s, e in zip(bounds[:-1], bounds[1:]):
            for p in range(s, e):
                if p - s < min_context:
                    continue
                ctx = [tokens[q] if q >= s else 0 for q in range(p - seq_len, p)]
                ref_x.append(ctx)
                ref_y.append(tokens[p])
        np.testing.assert_array_equal(x, np.asarray(ref_x).reshape(-1, seq_len))
        np.testing.assert_array_equal(y, ref_y)


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_leaf(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no LEAF JSON files"):
        load_leaf(str(tmp_path))
    (tmp_path / "bad.json").write_text(json.dumps({"users": ["a"]}))
    with pytest.raises(ValueError, match="missing key 'user_data'"):
        load_leaf(str(tmp_path / "bad.json"))
    blob = {"users": ["a"], "num_samples": [3], "user_data": {"a": {"x": [[1.0]], "y": [0]}}}
    (tmp_path / "bad.json").write_text(json.dumps(blob))
    with pytest.raises(ValueError, match=r"num_samples\[0\] = 3"):
        load_leaf(str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="unknown task 'mnist'; valid tasks"):
        load_leaf(str(tmp_path / "bad.json"), task="mnist")
    with pytest.raises(ValueError, match="cannot infer the task"):
        leaf.infer_task(3, 1)


@pytest.mark.parametrize("content, why", [
    (np.random.default_rng(0).bytes(300), "could not read as JSON"),
    (b'{"users": ["a"], "user_data": {"a": {"x": [[1.0]], "y": [0]}', "could not read as JSON"),
    (b"[1, 2]", "the JSON holds a list, not an object"),
    (json.dumps({"users": ["a"], "user_data": {}}).encode(),
     "user 'a' has no entry in 'user_data'"),
    (json.dumps({"users": ["a"], "user_data": {"a": {"x": [[1.0]]}}}).encode(),
     "user 'a' has user_data .* not lists 'x' and 'y'"),
    (json.dumps({"users": ["a", "b"], "num_samples": [1],
                 "user_data": {"a": {"x": [[1.0]], "y": [0]}}}).encode(),
     "'num_samples' must list one count per user"),
])
def test_corrupt_file_names_the_file_and_the_format(tmp_path, content, why):
    path = tmp_path / "data" / "train" / "part_0.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    match = re.escape(f"leaf:{path}: ") + why + ".*expected a LEAF JSON file .*users.*user_data"
    with pytest.raises(ValueError, match=match):
        load_leaf(str(tmp_path))
    from fedjax_lab.data import load
    with pytest.raises(ValueError, match=match):
        load(f"leaf:{path}")


def test_unreadable_celeba_image_names_the_file(tmp_path):
    root = tmp_path / "celeba"
    write_leaf(str(root / "data/all_data/all.json"), {"u": (["000001.jpg"], [1])})
    (root / "data/raw/img_align_celeba").mkdir(parents=True)
    (root / "data/raw/img_align_celeba/000001.jpg").write_text("not an image")
    image = root / "data/raw/img_align_celeba/000001.jpg"
    with pytest.raises(ValueError, match=re.escape(str(image)) + ".*expected a JPEG/PNG"):
        load_leaf(str(root))
