"""Federated data: flat per-feature arrays + offsets, partitioners and datasets."""
from fedjax_lab.data import partition
from fedjax_lab.data.federated import (FederatedArrays, federated_arrays, from_client_lists,
                                       split_clients)
from fedjax_lab.data.synthetic import synthetic

DATASETS = {
    "synthetic": "FedProx's Synthetic(alpha, beta) (or -IID), 30 clients, logistic 60 -> 10; offline",
}

__all__ = ["FederatedArrays", "federated_arrays", "from_client_lists", "split_clients", "synthetic",
           "partition", "DATASETS"]
