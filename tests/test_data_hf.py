"""data.hf: a Hugging Face dataset saved to disk (built offline from arrays), partitioned by Flower
Datasets' partitioners or a natural id column, gives the clients the partitioner gives (sizes,
labels, rows); the `hf:` spec; our partitioners vs Flower's on the same seed (README's table);
errors, including the missing `hf` extra."""
import sys
import warnings

import numpy as np
import pytest

datasets = pytest.importorskip("datasets", reason="the `hf` extra (datasets) is not installed")
fp = pytest.importorskip("flwr_datasets.partitioner",
                         reason="the `hf` extra (flwr-datasets) is not installed")

import fedjax_lab as fl  # noqa: E402
from fedjax_lab.data import partition  # noqa: E402
from fedjax_lab.data.hf import load_hf, partition_rows  # noqa: E402

N, K = 300, 6


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """300 8x8 uint8 'images' (pixel [0, 0] = the row number mod 256, pixel [0, 1] = row // 256,
    so every example is identifiable), labels 0..9, a writer id 0..6."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (N, 8, 8)).astype(np.uint8)
    images[:, 0, 0], images[:, 0, 1] = np.arange(N) % 256, np.arange(N) // 256
    ds = datasets.Dataset.from_dict({"image": images, "label": rng.integers(0, 10, N),
                                     "writer": rng.integers(0, 7, N)})
    path = str(tmp_path_factory.mktemp("hf") / "digits_like")
    ds.save_to_disk(path)
    return ds, path


def rows_of(data):
    """The original row number of every example of every client (train split)."""
    x = np.rint(np.asarray(data.x) * 255).astype(np.int64)
    row = x[:, 0, 0, 0] + 256 * x[:, 0, 1, 0]
    off = np.asarray(data.offsets)
    return [np.sort(row[off[k]:off[k + 1]]) for k in range(data.num_clients)]


PARTITIONERS = {
    "iid": lambda: fp.IidPartitioner(num_partitions=K),
    "dirichlet": lambda: fp.DirichletPartitioner(K, "label", alpha=0.5, min_partition_size=5, seed=3),
    "shard": lambda: fp.ShardPartitioner(K, "label", num_shards_per_partition=2, seed=3),
    "pathological": lambda: fp.PathologicalPartitioner(K, "label", num_classes_per_partition=3,
                                                       seed=3),
    "natural_id": lambda: fp.NaturalIdPartitioner(partition_by="writer"),
}


@pytest.mark.parametrize("kind", sorted(PARTITIONERS))
def test_clients_are_the_partitioners_own_partitions(saved, kind):
    ds, path = saved
    data = load_hf(path, features="image", partitioner=PARTITIONERS[kind](), test_fraction=0)
    own = PARTITIONERS[kind]()              # the partitioner's own output on the same dataset
    own.dataset = ds
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parts = [own.load_partition(k) for k in range(own.num_partitions)]
    assert data.num_clients == len(parts)
    np.testing.assert_array_equal(np.diff(np.asarray(data.offsets)), [len(p) for p in parts])
    off, y = np.asarray(data.offsets), np.asarray(data.y)
    for k, part in enumerate(parts):
        np.testing.assert_array_equal(np.sort(y[off[k]:off[k + 1]]), np.sort(part["label"]))
        want = np.sort(np.asarray(part["image"])[:, 0, 0].astype(np.int64)
                       + 256 * np.asarray(part["image"])[:, 0, 1])
        np.testing.assert_array_equal(rows_of(data)[k], want)
    assert data.x.shape[1:] == (8, 8, 1) and data.x.dtype == np.float32
    assert float(data.x.max()) <= 1.0 and data.num_classes == 10


def test_natural_id_column_and_the_test_split(saved):
    ds, path = saved
    data = load_hf(ds, features=["image"], client_column="writer", test_fraction=0.25, seed=1)
    writer = np.asarray(ds["writer"])
    assert data.num_clients == 7
    train, test = np.diff(np.asarray(data.offsets)), np.diff(np.asarray(data.test.offsets))
    np.testing.assert_array_equal(train + test, np.bincount(writer))
    np.testing.assert_array_equal(test, np.rint(0.25 * np.bincount(writer)))
    for k, rows in enumerate(rows_of(data)):
        assert (writer[rows] == k).all()
    # the spec string gives the same clients
    same = fl.data.load(f"hf:{path},features=image,natural=writer,test_fraction=0.25", seed=1)
    np.testing.assert_array_equal(np.asarray(same.offsets), np.asarray(data.offsets))
    np.testing.assert_array_equal(np.asarray(same.y), np.asarray(data.y))


def test_spec_builds_flowers_partitioner_with_the_run_seed(saved):
    ds, path = saved
    data = fl.data.load(f"hf:{path},features=image,dirichlet=0.5,clients={K},min_size=5,"
                        f"test_fraction=0", seed=3)
    want = [np.sort(r) for r in partition_rows(ds, PARTITIONERS["dirichlet"]())]
    for got, rows in zip(rows_of(data), want):
        np.testing.assert_array_equal(got, rows)
    shards = fl.data.load(f"hf:{path},features=image,shards=2,clients={K}", seed=0)
    assert shards.num_clients == K and shards.test.num_examples > 0
    with pytest.raises(ValueError, match="give one partition"):
        fl.data.load(f"hf:{path},iid,dirichlet=0.3,clients=3")
    with pytest.raises(ValueError, match="needs clients=N"):
        fl.data.load(f"hf:{path},iid")
    with pytest.raises(ValueError, match="unknown option 'bogus' for dataset 'hf'"):
        fl.data.load(f"hf:{path},iid,clients=3,bogus=1")


def compare(labels, seed):
    """Per partitioner: do ours and Flower's give the same client sizes, the same per-client label
    histograms, the same clients (rows), on the same seed?"""
    ds = datasets.Dataset.from_dict({"label": labels})
    n = labels.shape[0]
    pairs = {
        "iid": (partition.iid(n, K, seed=seed), fp.IidPartitioner(K)),
        "dirichlet": (partition.dirichlet(labels, K, alpha=0.5, seed=seed),
                      fp.DirichletPartitioner(K, "label", 0.5, min_partition_size=0, seed=seed)),
        "shards": (partition.shards(labels, K, shards_per_client=2, seed=seed),
                   fp.ShardPartitioner(K, "label", num_shards_per_partition=2, seed=seed)),
    }
    out = {}
    for name, (ours, theirs) in pairs.items():
        owner = np.full(n, -1)
        for k, rows in enumerate(partition_rows(ds, theirs)):
            owner[rows] = k
        hist = lambda o: np.stack([np.bincount(labels[o == k], minlength=10) for k in range(K)])
        out[name] = dict(sizes=bool((np.bincount(ours, minlength=K)
                                     == np.bincount(owner[owner >= 0], minlength=K)).all()),
                         labels=bool((hist(ours) == hist(owner)).all()),
                         rows=bool((ours == owner).all()), all_used=bool((owner >= 0).all()))
    return out


def test_our_partitioners_versus_flowers_on_the_same_seed():
    """What README's table states: iid and shards give the same client sizes (divisible n) but
    other clients; Dirichlet differs in sizes too; with n not divisible by the shard count
    Flower's ShardPartitioner drops the incomplete shard (keep_incomplete_shard=False) where ours
    hands out every example. power_law (log-normal sizes) has no Flower counterpart."""
    rng = np.random.default_rng(1)
    for seed in (0, 42):
        res = compare(rng.integers(0, 10, 600), seed)
        assert res["iid"] == dict(sizes=True, labels=False, rows=False, all_used=True)
        assert res["shards"] == dict(sizes=True, labels=False, rows=False, all_used=True)
        assert res["dirichlet"] == dict(sizes=False, labels=False, rows=False, all_used=True)
    odd = compare(rng.integers(0, 10, 605), 0)
    assert odd["iid"]["sizes"] and not odd["iid"]["rows"]
    assert not odd["shards"]["all_used"] and not odd["shards"]["sizes"]


def test_bad_input_and_the_missing_extra(saved, monkeypatch):
    ds, path = saved
    with pytest.raises(ValueError, match="exactly one of partitioner"):
        load_hf(ds)
    with pytest.raises(ValueError, match="label: no column 'digit'"):
        load_hf(ds, label="digit", client_column="writer")
    with pytest.raises(ValueError, match="features: no column"):
        load_hf(ds, features="img", client_column="writer")
    used = fp.IidPartitioner(2)
    used.dataset = ds
    with pytest.raises(ValueError, match="already has a dataset"):
        load_hf(ds, partitioner=used)
    monkeypatch.setitem(sys.modules, "flwr_datasets", None)
    with pytest.raises(ImportError, match=r"install the `hf` extra: pip install 'fedjax_lab\[hf\]'"):
        load_hf(ds, partitioner=fp.IidPartitioner(2))
