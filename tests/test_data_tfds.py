"""TFDS loaders through the real `tfds.data_source` path, with `tfds.testing.mock_data`, and a real
ArrayRecord directory written from arrays by TFDS's own builders (data.tfds.save_tfds)."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from fedjax_lab.data import load  # noqa: E402
from fedjax_lab.data.stats import label_counts  # noqa: E402
from fedjax_lab.data.tfds import DatasetNotPrepared, _letters, load_tfds  # noqa: E402


def _raw(name, split):
    src = tfds.data_source(name, split=split)
    return (np.stack([src[i]["image"] for i in range(len(src))]),
            np.asarray([src[i]["label"] for i in range(len(src))]))


def _rows(x):
    flat = np.asarray(x).reshape(len(x), -1)
    return flat[np.lexsort(flat.T[::-1])]


@pytest.mark.parametrize("name, tfds_name, shape, classes", [
    ("mnist", "mnist", (28, 28, 1), 10),
    ("fashion_mnist", "fashion_mnist", (28, 28, 1), 10),
    ("emnist", "emnist/byclass", (28, 28, 1), 62),
    ("emnist/digits", "emnist/digits", (28, 28, 1), 10),
    ("cifar10", "cifar10", (32, 32, 3), 10),
    ("cifar100", "cifar100", (32, 32, 3), 100),
    ("svhn", "svhn_cropped", (32, 32, 3), 10),
])
def test_loads_every_dataset_with_unit_pixels(name, tfds_name, shape, classes):
    with tfds.testing.mock_data(num_examples=40):
        d = load_tfds(name, num_clients=4, partition="iid", normalize="unit", seed=0)
        x_raw, y_raw = _raw(tfds_name, "train")
        xt_raw, _ = _raw(tfds_name, "test")
    assert d.num_clients == 4 and d.num_classes == classes and d.x.shape[1:] == shape
    np.testing.assert_array_equal(np.asarray(d.client_sizes), [10, 10, 10, 10])
    assert d.test.num_examples == 40              # the TFDS test split, partitioned
    if name.startswith("emnist"):                 # TFDS stores EMNIST transposed; we undo it
        x_raw, xt_raw = np.swapaxes(x_raw, 1, 2), np.swapaxes(xt_raw, 1, 2)
    np.testing.assert_allclose(_rows(np.asarray(d.x) * 255), _rows(x_raw), atol=1e-3)
    np.testing.assert_allclose(_rows(np.asarray(d.test.x) * 255), _rows(xt_raw), atol=1e-3)
    np.testing.assert_array_equal(np.bincount(np.asarray(d.y), minlength=classes),
                                  np.bincount(y_raw, minlength=classes))


def test_standard_normalization_and_holdout():
    with tfds.testing.mock_data(num_examples=50):
        d = load_tfds("cifar10", num_clients=5, test="holdout", test_fraction=0.2)
    x = np.asarray(d.x)
    assert d.num_examples + d.test.num_examples == 50 and d.test.num_examples == 10
    # per-channel statistics are those of the whole training split, train + held-out shares
    both = np.concatenate([x, np.asarray(d.test.x)])
    np.testing.assert_allclose(both.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
    np.testing.assert_allclose(both.std(axis=(0, 1, 2)), 1.0, atol=1e-3)


def test_test_split_partitioned_with_train_label_skew():
    with tfds.testing.mock_data(num_examples=300):
        d = load_tfds("mnist", num_clients=6, partition="dirichlet=0.2", seed=3)
    train, test = label_counts(d), label_counts(d.test)
    for c in range(10):
        share = train[:, c] / train[:, c].sum()
        assert np.all(np.abs(test[:, c] - share * test[:, c].sum()) <= 1.0)
    assert (train > 0).sum(1).mean() < 8      # dirichlet(0.2): clients miss classes


def test_spec_and_max_examples():
    with tfds.testing.mock_data(num_examples=60):
        d = load("fashion_mnist:shards=2,clients=5,max_examples=30,normalize=none", seed=1)
        e = load("emnist:digits,clients=3")
    assert d.num_examples == 30 and d.test.num_examples == 30 and float(d.x.max()) > 1.0
    assert e.num_classes == 10


def test_emnist_upright_option():
    with tfds.testing.mock_data(num_examples=20):
        up = load_tfds("emnist/digits", num_clients=2, normalize="none")
        raw = load_tfds("emnist/digits", num_clients=2, normalize="none", emnist_upright=False)
    np.testing.assert_array_equal(np.asarray(up.x), np.swapaxes(np.asarray(raw.x), 1, 2))
    assert not np.array_equal(np.asarray(up.x), np.asarray(raw.x))


def test_letters_shift_and_check():
    np.testing.assert_array_equal(_letters(np.array([1, 26, 5])), [0, 25, 4])
    with tfds.testing.mock_data(num_examples=30):     # mock labels span TFDS's 37 ids
        with pytest.raises(ValueError, match="expected TFDS's labels 1..26"):
            load_tfds("emnist/letters", num_clients=2)


def test_missing_dataset_says_how_to_prepare_it(tmp_path):
    with pytest.raises(DatasetNotPrepared) as info:
        load_tfds("mnist", num_clients=2, data_dir=str(tmp_path))
    msg = str(info.value)
    assert "tfds build mnist --file_format=array_record" in msg and "data_dir" in msg
    with pytest.raises(FileNotFoundError, match="tfds build cifar10"):
        load(f"cifar10:clients=3,data_dir={tmp_path}")


def test_missing_dataset_in_default_dir_is_not_a_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    with pytest.raises(DatasetNotPrepared, match=f"no prepared copy under data_dir={tmp_path}"):
        load_tfds("svhn", num_clients=2)


def test_bad_names_and_options():
    with pytest.raises(ValueError, match="unknown TFDS dataset 'imagenet'; valid"):
        load_tfds("imagenet")
    with pytest.raises(ValueError, match="normalize must be one of"):
        load_tfds("mnist", normalize="zscore")
    with pytest.raises(ValueError, match="unknown option 'resize' for dataset 'mnist'; valid options"):
        load("mnist:resize=32")
    with pytest.raises(ValueError, match="unknown positional option 'balanced'"):
        load("emnist:balanced")


def test_import_fedjax_lab_does_not_import_tfds():
    code = ("import sys, fedjax_lab, fedjax_lab.data.tfds; "
            "bad = [m for m in ('tensorflow_datasets', 'tensorflow') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def _prepared_mnist_with_bad_files(data_dir, kind):
    """A data_dir/mnist/3.0.1 laid out as `tfds build --file_format=array_record` leaves it, with
    the files damaged as `kind` says."""
    from tensorflow_datasets.core import naming
    builder = tfds.builder("mnist", data_dir=str(data_dir), file_format="array_record")
    os.makedirs(builder.data_dir)
    if kind == "dataset_info.json is not JSON":
        (data_dir / "mnist" / os.path.basename(builder.data_dir) / "dataset_info.json").write_text(
            "<html>proxy error</html>")
        return
    splits = [tfds.core.SplitInfo(
        name=s, shard_lengths=[4], num_bytes=400,
        filename_template=naming.ShardedFileTemplate(
            data_dir=builder.data_dir, template=naming.DEFAULT_FILENAME_TEMPLATE,
            dataset_name="mnist", split=s, filetype_suffix="array_record"))
        for s in ("train", "test")]
    builder.info.set_splits(tfds.core.SplitDict(splits))
    builder.info.write_to_directory(builder.data_dir)
    if kind == "shards are random bytes":
        rng = np.random.default_rng(0)
        for s in ("train", "test"):
            for f in builder.info.splits[s].filepaths:
                open(f, "wb").write(rng.bytes(300))


@pytest.mark.parametrize("kind", ["dataset_info.json is not JSON", "shards are random bytes",
                                  "shards are missing"])
def test_corrupt_prepared_dataset_names_the_folder_and_the_format(tmp_path, kind):
    _prepared_mnist_with_bad_files(tmp_path, kind)
    match = (re.escape(f"TFDS dataset 'mnist' at {tmp_path / 'mnist'}: could not read its train "
                       "split") + ".*corrupt or incomplete. Expected a dataset prepared by "
             + re.escape("`tfds build mnist --file_format=array_record`"))
    with pytest.raises(ValueError, match=match):
        load_tfds("mnist", num_clients=2, data_dir=str(tmp_path))
    with pytest.raises(ValueError, match=match):
        load(f"mnist:clients=2,data_dir={tmp_path}")


@pytest.mark.parametrize("name, shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_a_real_tfds_directory_built_from_arrays_loads_like_a_prepared_dataset(tmp_path, name,
                                                                                shape):
    """save_tfds writes a dataset with TFDS's own builder (ArrayRecord shards, dataset_info.json)
    under data_dir, no TensorFlow, no network; `load("NAME:...,data_dir=...")` reads it through
    tfds.data_source exactly as a copy made by `tfds build` and partitions it."""
    from fedjax_lab.data import partition
    from fedjax_lab.data.tfds import save_tfds
    rng = np.random.default_rng(0)
    splits = {s: (rng.integers(0, 256, (n,) + shape).astype(np.uint8), rng.integers(0, 10, n))
              for s, n in (("train", 48), ("test", 16))}
    folder = save_tfds(name, splits, str(tmp_path))
    files = sorted(os.listdir(folder))
    assert "dataset_info.json" in files and any(".array_record-" in f for f in files)
    assert "tensorflow" not in sys.modules
    data = load(f"{name}:dirichlet=0.5,clients=4,normalize=unit,data_dir={tmp_path}", seed=1)
    assert data.num_clients == 4 and data.x.shape[1:] == shape and data.num_classes == 10
    # every example, as stored: pixels and labels (the files keep TFDS's shuffled order)
    for d, (x, y) in ((data, splits["train"]), (data.test, splits["test"])):
        stored = np.concatenate([np.asarray(d.x).reshape(len(d.x), -1) * 255,
                                 np.asarray(d.y)[:, None]], 1)
        want = np.concatenate([x.reshape(len(x), -1), y[:, None]], 1).astype(np.float32)
        np.testing.assert_allclose(_rows(stored), _rows(want), atol=1e-3)
    # partitioned as partition.dirichlet splits the labels in the order the source reads them
    src = tfds.data_source(name, split="train", data_dir=str(tmp_path))
    y_src = np.asarray([src[i]["label"] for i in range(len(src))])
    owner = partition.dirichlet(y_src, 4, alpha=0.5, seed=1)
    np.testing.assert_array_equal(np.asarray(data.client_sizes), np.bincount(owner, minlength=4))
    np.testing.assert_array_equal(np.asarray(data.y), y_src[np.argsort(owner, kind="stable")])
