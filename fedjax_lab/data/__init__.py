"""Federated data: flat per-feature arrays + offsets, partitioners and datasets."""
from fedjax_lab.data import partition
from fedjax_lab.data.federated import (FederatedArrays, federated_arrays, from_client_lists,
                                       split_clients)
from fedjax_lab.data.spec import LOADERS, load, parse_spec
from fedjax_lab.data.synthetic import synthetic

DATASETS = {name: desc for name, (_, desc) in LOADERS.items()}

__all__ = ["FederatedArrays", "federated_arrays", "from_client_lists", "split_clients", "synthetic",
           "partition", "DATASETS", "load", "parse_spec"]
