"""Federated data: flat per-feature arrays + offsets, partitioners and datasets."""
from fedjax_lab.data import partition
from fedjax_lab.data.federated import (FederatedArrays, federated_arrays, from_client_lists,
                                       split_clients)
from fedjax_lab.data.leaf import load_leaf
from fedjax_lab.data.npz import load_npz, save_npz
from fedjax_lab.data.realdata import digits, federate, mnist1d
from fedjax_lab.data.spec import LOADERS, load, parse_spec
from fedjax_lab.data.sqlite import load_sqlite
from fedjax_lab.data.synthetic import synthetic


def load_tfds(name, **kwargs):
    """TFDS image datasets (see data.tfds); tensorflow_datasets is imported only when called."""
    from fedjax_lab.data.tfds import load_tfds as _load_tfds
    return _load_tfds(name, **kwargs)


def load_hf(dataset, **kwargs):
    """A Hugging Face dataset partitioned by a column or a Flower Datasets partitioner (data.hf)."""
    from fedjax_lab.data.hf import load_hf as _load_hf
    return _load_hf(dataset, **kwargs)


DATASETS = {name: desc for name, (_, desc) in LOADERS.items()}

__all__ = ["FederatedArrays", "federated_arrays", "from_client_lists", "split_clients", "synthetic",
           "partition", "DATASETS", "load", "parse_spec", "load_tfds", "load_leaf", "load_sqlite",
           "load_npz", "save_npz", "load_hf", "digits", "mnist1d", "federate"]
