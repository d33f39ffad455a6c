"""Hugging Face datasets as federated data: a `datasets.Dataset` (or a directory written by its
`save_to_disk`) and a partition become FederatedArrays.

    from flwr_datasets.partitioner import DirichletPartitioner
    data = load_hf("/data/cifar10_train", label="label", features="img",
                   partitioner=DirichletPartitioner(num_partitions=100, partition_by="label",
                                                    alpha=0.3, seed=0))
    data = load_hf(femnist, label="character", features="image", client_column="writer_id")

The partition is either a natural id column (`client_column`: FEMNIST's writer, Shakespeare's
speaker; clients in sorted id order, examples in dataset order) or any Flower Datasets
partitioner (`flwr_datasets.partitioner.*`, not yet given a dataset): client k holds exactly the
rows of `partitioner.load_partition(k)` (shuffled within the client and split into its train and
test parts by data.federated.split_clients; `test_fraction=0` keeps them all for training). Spec strings: `hf:/path,label=label,features=img,dirichlet=0.3,
clients=100` (data/spec.py). Needs the `hf` extra: `pip install fedjax_lab[hf]`.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np

from fedjax_lab.data.federated import FederatedArrays, split_clients

_EXTRA = "pip install 'fedjax_lab[hf]'"
_ROW = "__fedjax_lab_row__"


def _require(module):
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{module.split('.')[0]} is needed for Hugging Face / Flower Datasets "
                          f"data; install the `hf` extra: {_EXTRA}") from e


def load_hf(dataset, *, label: str = "label", features: Union[str, Sequence[str], None] = None,
            partitioner=None, client_column: Optional[str] = None, test_fraction: float = 0.2,
            num_classes: Optional[int] = None, normalize: bool = True, max_clients: Optional[int] = None,
            seed: int = 0) -> FederatedArrays:
    """A Hugging Face dataset, partitioned, as FederatedArrays.

    dataset: a `datasets.Dataset`, or the path of one saved with `save_to_disk` (a DatasetDict
    there must hold a "train" split).
    label: the integer (or ClassLabel, or string) label column; strings are numbered in sorted
    order. features: the input column, or several scalar columns stacked as [n, k]; default: every
    column but the label and the client column.
    partitioner: a Flower Datasets partitioner with no dataset assigned yet; client_column: a
    natural id column. Exactly one of the two.
    test_fraction: each client's held-out share (data.federated.split_clients; 0: none).
    normalize: integer images (>= 2 axes per example) become float32 in [0, 1], 2-D ones get a
    channel axis. max_clients: keep the first n clients.
    """
    datasets = _require("datasets")
    if isinstance(dataset, str):
        loaded = datasets.load_from_disk(dataset)
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise ValueError(f"dataset: {dataset!r} holds splits {sorted(loaded)}, no 'train'")
            loaded = loaded["train"]
        dataset = loaded
    if not isinstance(dataset, datasets.Dataset):
        raise ValueError(f"dataset must be a datasets.Dataset or a save_to_disk path, got "
                         f"{type(dataset).__name__}")
    if (partitioner is None) == (client_column is None):
        raise ValueError("give exactly one of partitioner= (a flwr_datasets partitioner) and "
                         "client_column= (a natural id column)")
    columns = list(dataset.column_names)
    for name, col in (("label", label), ("client_column", client_column)):
        if col is not None and col not in columns:
            raise ValueError(f"{name}: no column {col!r}; columns: {columns}")
    if features is None:
        features = [c for c in columns if c not in (label, client_column)]
    names = [features] if isinstance(features, str) else list(features)
    missing = [c for c in names if c not in columns]
    if missing or not names:
        raise ValueError(f"features: no column(s) {missing or names}; columns: {columns}")

    if client_column is not None:
        ids = np.asarray(dataset.with_format("numpy")[client_column])
        _, owner = np.unique(ids, return_inverse=True)
        rows = [np.flatnonzero(owner == k) for k in range(int(owner.max()) + 1 if owner.size else 0)]
    else:
        rows = partition_rows(dataset, partitioner)
    x, y, classes = _arrays(dataset, names, label, normalize)
    if max_clients is not None:
        rows = rows[:max_clients]
    order = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    owner = np.repeat(np.arange(len(rows)), [len(r) for r in rows])
    return split_clients(x[order], y[order], owner, len(rows), test_fraction=test_fraction,
                         seed=seed, num_classes=num_classes or classes,
                         allow_empty=any(len(r) == 0 for r in rows))


def partition_rows(dataset, partitioner) -> list:
    """The row indices of every partition of `partitioner` applied to `dataset`, in its order."""
    _require("flwr_datasets")
    from flwr_datasets.partitioner import Partitioner
    if not isinstance(partitioner, Partitioner):
        raise ValueError(f"partitioner must be a flwr_datasets.partitioner.Partitioner, got "
                         f"{type(partitioner).__name__}")
    if partitioner.is_dataset_assigned():
        raise ValueError("partitioner: it already has a dataset; pass a fresh partitioner")
    partitioner.dataset = dataset.add_column(_ROW, np.arange(len(dataset)))
    return [np.asarray(partitioner.load_partition(k)[_ROW], np.int64)
            for k in range(partitioner.num_partitions)]


def _arrays(dataset, names, label, normalize):
    """(x, y, num_classes) as numpy arrays from the dataset's columns."""
    table = dataset.with_format("numpy")
    feature = dataset.features.get(label)
    y = np.asarray(table[label])
    if getattr(feature, "names", None) is not None:             # ClassLabel
        classes = len(feature.names)
    elif y.dtype.kind in "US O":
        values, y = np.unique(y.astype(str), return_inverse=True)
        classes = len(values)
    else:
        classes = int(y.max()) + 1 if y.size else 0
    y = y.astype(np.int32)
    cols = [np.asarray(table[c]) for c in names]
    for c, a in zip(names, cols):
        if a.dtype == object or a.dtype.kind in "US":
            raise ValueError(f"features: column {c!r} holds {a.dtype} values (text or ragged "
                             f"arrays); tokenize or pad it to a fixed shape first")
    if len(cols) == 1:
        x = cols[0]
    else:
        if any(a.ndim != 1 for a in cols):
            raise ValueError(f"features: several columns {names} must each be scalar per example")
        x = np.stack(cols, axis=1).astype(np.float32)
    if normalize and x.ndim >= 3 and np.issubdtype(x.dtype, np.integer):
        x = x.astype(np.float32) / 255.0
        if x.ndim == 3:
            x = x[..., None]
    elif np.issubdtype(x.dtype, np.floating) and x.dtype != np.float32:
        x = x.astype(np.float32)
    return x, y, classes


# spec partitions -> (Flower Datasets class, its keyword for the value)
_PARTITIONERS = {"iid": ("IidPartitioner", None),
                 "dirichlet": ("DirichletPartitioner", "alpha"),
                 "shards": ("ShardPartitioner", "num_shards_per_partition"),
                 "pathological": ("PathologicalPartitioner", "num_classes_per_partition")}


def flower_partitioner(kind: str, value=None, *, num_clients: int, label: str = "label",
                       seed: int = 0, min_size: Optional[int] = None):
    """A Flower Datasets partitioner by the spec's name: iid, dirichlet=alpha,
    shards=shards_per_client, pathological=classes_per_client (labels from column `label`)."""
    if kind not in _PARTITIONERS:
        raise ValueError(f"partition {kind!r} is not one of {sorted(_PARTITIONERS)} (or "
                         f"natural=COLUMN)")
    _require("flwr_datasets")
    import flwr_datasets.partitioner as fp
    cls, key = _PARTITIONERS[kind]
    if key is None:
        return fp.IidPartitioner(num_partitions=num_clients)
    if value is None:
        raise ValueError(f"partition {kind!r} needs a value, e.g. {kind}=2")
    kw = {"num_partitions": num_clients, "partition_by": label, "seed": seed,
          key: float(value) if kind == "dirichlet" else int(value)}
    if kind == "dirichlet" and min_size is not None:
        kw["min_partition_size"] = int(min_size)
    return getattr(fp, cls)(**kw)


_SPEC_OPTIONS = ["label", "features", "clients", "min_size", "natural", "client_column", "partition",
                 "test_fraction", "max_clients", "num_classes", "normalize"]


def load_hf_spec(args, kwargs, seed) -> FederatedArrays:
    """`hf:PATH,label=COL,features=COL[+COL...],PARTITION,clients=N,test_fraction=f,...` with
    PARTITION one of iid | dirichlet=a | shards=k | pathological=k (Flower Datasets' partitioners,
    seeded with the run's seed; min_size= for Dirichlet's min_partition_size, default Flower's 10)
    | natural=COLUMN (a natural id column: FEMNIST's writer, Shakespeare's speaker)."""
    if len(args) < 1:
        raise ValueError("dataset 'hf' needs the path of a dataset saved with save_to_disk, e.g. "
                         "`hf:/data/femnist,natural=writer_id`")
    path, partition = args[0], [a.lower() for a in args[1:]]
    opts = {"label": "label", "features": None, "test_fraction": 0.2, "normalize": True,
            "max_clients": None, "num_classes": None}
    clients, min_size = None, None
    for k, v in kwargs.items():
        k = k.lower()
        if k in _PARTITIONERS or k == "natural":
            partition.append(f"{k}={v}")
        elif k == "partition":
            partition.append(str(v))
        elif k in ("clients", "num_clients"):
            clients = int(v)
        elif k == "min_size":
            min_size = int(v)
        elif k == "features":
            opts["features"] = str(v).split("+")
        elif k in ("label", "client_column"):
            if k == "client_column":
                partition.append(f"natural={v}")
            else:
                opts[k] = str(v)
        elif k in ("test_fraction",):
            opts[k] = float(v)
        elif k in ("max_clients", "num_classes"):
            opts[k] = int(v)
        elif k == "normalize":
            opts[k] = str(v).lower() in ("true", "1")
        else:
            raise ValueError(f"unknown option {k!r} for dataset 'hf'; valid options: "
                             f"{sorted(_SPEC_OPTIONS + list(_PARTITIONERS))}")
    if len(partition) != 1:
        raise ValueError(f"dataset 'hf': give one partition (iid, dirichlet=a, shards=k, "
                         f"pathological=k or natural=COLUMN), got {partition or 'none'}")
    kind, _, value = partition[0].partition("=")
    if kind == "natural":
        return load_hf(path, client_column=value, seed=seed, **opts)
    if clients is None:
        raise ValueError(f"dataset 'hf': partition {kind!r} needs clients=N")
    return load_hf(path, partitioner=flower_partitioner(kind, value or None, num_clients=clients,
                                                        label=opts["label"], seed=seed,
                                                        min_size=min_size), seed=seed, **opts)
