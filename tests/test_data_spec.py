"""`data.load(spec)` for the datasets of the data layer: options, aliases, errors."""
import re

import numpy as np
import pytest

from fedjax_lab.data import DATASETS, load, realdata


def _same(a, b):
    np.testing.assert_array_equal(np.asarray(a.offsets), np.asarray(b.offsets))
    np.testing.assert_array_equal(np.asarray(a.y), np.asarray(b.y))
    np.testing.assert_array_equal(np.asarray(a.test.offsets), np.asarray(b.test.offsets))


def test_every_issue_dataset_is_registered():
    for name in ("synthetic", "digits", "mnist1d", "mnist", "fashion_mnist", "emnist", "cifar10",
                 "cifar100", "svhn", "leaf", "sqlite", "npz"):
        assert name in DATASETS and DATASETS[name]


@pytest.mark.parametrize("spec, kwargs", [
    ("digits:dirichlet=0.3,clients=20", dict(partition="dirichlet=0.3", num_clients=20)),
    ("digits:shards=3,num_clients=10,test=partition",
     dict(partition="shards=3", num_clients=10, test="partition")),
    ("digits:iid,clients=7,test_fraction=0.1", dict(partition="iid", num_clients=7,
                                                    test_fraction=0.1)),
    ("digits:alpha=0.5,clients=9", dict(partition="dirichlet=0.5", num_clients=9)),
    ("digits:partition=power_law,clients=9", dict(partition="power_law", num_clients=9)),
])
def test_spec_equals_direct_call(spec, kwargs):
    _same(load(spec, seed=2), realdata.digits(seed=2, **kwargs))


def test_mnist1d_spec_and_cli_style_options():
    _same(load("mnist1d:shards=2,clients=50"),
          realdata.mnist1d(partition="shards=2", num_clients=50))
    # the CLI passes --num-clients / --iid as keyword options (they override the spec)
    d = load("mnist1d:clients=50,samples=1000", num_clients=8, iid=True)
    assert d.num_clients == 8 and d.num_examples == 800


@pytest.mark.parametrize("spec, match", [
    ("digits:beta=1", "unknown option 'beta' for dataset 'digits'; valid options: .*dirichlet"),
    ("digits:dirichlet=0.3,iid", "give one partition"),
    ("digits:zipf", "unknown positional option 'zipf'"),
    ("mnist1d:power_law=-1", "power_law sigma must be > 0"),
    ("leaf:/a,/b", "needs exactly one path"),
    ("sqlite:/x.sqlite,clients=3", "clients come from the file"),
    ("cifar:clients=3", "unknown dataset 'cifar'; valid datasets: .*cifar10"),
])
def test_errors_list_valid_choices(spec, match):
    with pytest.raises(ValueError, match=match):
        load(spec)


@pytest.mark.parametrize("name, suffix, expected", [
    ("npz", ".npz", "could not read as a .npz archive .*expected an .npz written by numpy.savez"),
    ("leaf", ".json", "could not read as JSON .*expected a LEAF JSON file"),
    ("sqlite", ".sqlite", "is not a FedJAX SQLite dataset .*expected a FedJAX SQLite file"),
])
def test_corrupt_file_through_the_spec_names_the_file(tmp_path, name, suffix, expected):
    path = tmp_path / f"data{suffix}"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match=re.escape(f"{name}:{path}: ") + expected):
        load(f"{name}:{path},test_fraction=0.1")
