"""`load(spec)`: one string names a dataset and its options. Used by the CLI's --dataset.

    synthetic:1,1   synthetic:alpha=0.5,beta=0.5,clients=100   synthetic_iid
    digits:dirichlet=0.3,clients=20   mnist1d:shards=2,clients=50   mnist1d:power_law=2
    mnist:dirichlet=0.3,clients=100   emnist:letters,iid,clients=500   cifar10:shards=2,test=holdout
    leaf:/path/to/femnist   sqlite:/path/federated_emnist_train.sqlite   npz:/path/data.npz

Centralized datasets take one partition (`iid`, `dirichlet=alpha`, `shards=k`, `power_law=sigma`;
`alpha=` alone means Dirichlet), `clients=`, `test=holdout|partition`, `test_fraction=`.
Natural datasets (leaf, sqlite, npz) keep the clients of their files. Any dataset takes
`domains=K`: client k's inputs get domain k mod K's contrast and brightness (data/shift.py,
FedBN's feature shift).
"""
from __future__ import annotations

from fedjax_lab.data.synthetic import synthetic


def _synthetic(args, kwargs, seed, iid=False):
    names = {"alpha": "alpha", "beta": "beta", "clients": "num_clients", "num_clients": "num_clients",
             "dim": "dim", "classes": "num_classes", "num_classes": "num_classes",
             "iid": "iid", "test_fraction": "test_fraction", "min_size": "min_size",
             "max_size": "max_size"}
    out = {"iid": iid}
    if len(args) > 2:
        raise ValueError(f"synthetic takes at most two positional options (alpha, beta), got {args}")
    for name, v in zip(("alpha", "beta"), args):
        out[name] = float(v)
    for k, v in kwargs.items():
        if k not in names:
            raise ValueError(f"unknown option {k!r} for dataset 'synthetic'; valid options: "
                             f"{sorted(names)}")
        out[names[k]] = _parse_value(v)
    return synthetic(seed=seed, **out)


_PARTITION_KEYS = ("iid", "dirichlet", "shards", "power_law")
_COMMON = {"clients": "num_clients", "num_clients": "num_clients", "test": "test",
           "test_fraction": "test_fraction", "partition": "partition", "alpha": "alpha"}


def _partitioned(loader, dataset, args, kwargs, seed, extra=None, positional=None):
    """Options of a centralized dataset -> loader(partition=..., num_clients=..., ...)."""
    names = dict(_COMMON, **(extra or {}))
    out, partition = {}, []
    for a in args:
        low = a.lower()
        if low in _PARTITION_KEYS:
            partition.append(low)
        elif positional and low in positional[1]:
            out[positional[0]] = low
        else:
            valid = list(_PARTITION_KEYS) + (sorted(positional[1]) if positional else [])
            raise ValueError(f"unknown positional option {a!r} for dataset {dataset!r}; valid: {valid}")
    for k, v in kwargs.items():
        k = k.lower()
        if k in _PARTITION_KEYS:
            if k == "iid":
                if str(v).lower() not in ("true", "1"):
                    continue
                partition.append("iid")
            else:
                partition.append(f"{k}={v}")
        elif k == "alpha":
            partition.append(f"dirichlet={v}")
        elif k == "partition":
            partition.append(str(v))
        elif k in names:
            out[names[k]] = _parse_value(v)
        else:
            raise ValueError(f"unknown option {k!r} for dataset {dataset!r}; valid options: "
                             f"{sorted(set(names) | set(_PARTITION_KEYS))}")
    if len(partition) > 1:
        raise ValueError(f"dataset {dataset!r}: give one partition, got {partition}")
    if partition:
        out["partition"] = partition[0]
    return loader(seed=seed, **out)


def _natural(loader, dataset, args, kwargs, seed, names, seeded=True):
    """Options of a file-backed dataset: the first positional option is the path."""
    if len(args) != 1:
        raise ValueError(f"dataset {dataset!r} needs exactly one path, e.g. `{dataset}:/path/to/"
                         f"file`, got {args or 'none'}")
    out = {}
    for k, v in kwargs.items():
        if k.lower() not in names:
            hint = (" (the clients come from the file; max_clients= keeps the first n)"
                    if k in ("clients", "num_clients") else "")
            raise ValueError(f"unknown option {k!r} for dataset {dataset!r}{hint}; valid options: "
                             f"{sorted(names)}")
        out[names[k.lower()]] = v if names[k.lower()] in ("test_path", "vocab", "image_dir") \
            else _parse_value(v)
    if seeded:
        out["seed"] = seed
    return loader(args[0], **out)


def _tfds(name):
    def load_one(args, kwargs, seed):
        from fedjax_lab.data.tfds import load_tfds
        extra = {"data_dir": "data_dir", "normalize": "normalize", "download": "download",
                 "max_examples": "max_examples"}
        if name == "emnist":
            extra["upright"] = "emnist_upright"
        if name == "emnist":
            extra["split"] = "split"

        def loader(*, split=None, **kw):
            return load_tfds(f"emnist/{split}" if split else name, **kw)
        return _partitioned(loader, name, args, kwargs, seed, extra,
                            ("split", {"byclass", "letters", "digits"}) if name == "emnist" else None)
    return load_one


def _realdata(name):
    def load_one(args, kwargs, seed):
        from fedjax_lab.data import realdata
        extra = {"samples": "num_samples", "num_samples": "num_samples"} if name == "mnist1d" else {}
        return _partitioned(getattr(realdata, name), name, args, kwargs, seed, extra)
    return load_one


def _leaf(args, kwargs, seed):
    from fedjax_lab.data.leaf import load_leaf
    names = {k: k for k in ("task", "test_fraction", "max_clients", "max_words", "vocab_size",
                            "image_dir", "image_size")}
    return _natural(load_leaf, "leaf", args, kwargs, seed, names)


def _sqlite(args, kwargs, seed):
    from fedjax_lab.data.sqlite import load_sqlite
    names = {k: k for k in ("test_path", "task", "test_fraction", "max_clients", "seq_len", "vocab",
                            "vocab_size", "num_classes")}
    names["test"] = "test_path"
    return _natural(load_sqlite, "sqlite", args, kwargs, seed, names)


def _npz(args, kwargs, seed):
    from fedjax_lab.data.npz import load_npz
    names = {"test_fraction": "test_fraction", "num_classes": "num_classes"}
    return _natural(load_npz, "npz", args, kwargs, seed, names)


def _hf(args, kwargs, seed):
    from fedjax_lab.data.hf import load_hf_spec
    return load_hf_spec(args, kwargs, seed)


_PART = "partition: iid | dirichlet=a | shards=k | power_law=s; clients=N; test=partition|holdout"

LOADERS = {
    "synthetic": (lambda a, kw, seed: _synthetic(a, kw, seed),
                  "FedProx's Synthetic(alpha, beta): `synthetic:1,1` or `synthetic:alpha=1,beta=1,clients=30`"),
    "synthetic_iid": (lambda a, kw, seed: _synthetic(a, kw, seed, iid=True),
                      "FedProx's Synthetic-IID (one model, one input distribution for all clients)"),
    "digits": (_realdata("digits"), "scikit-learn's 1,797 real 8x8 digits, offline; " + _PART),
    "mnist1d": (_realdata("mnist1d"), "MNIST-1D (40-dim signals, 10 classes), offline; samples=N; "
                + _PART),
    "mnist": (_tfds("mnist"), "TFDS MNIST (prepared ArrayRecord, data_dir=); " + _PART),
    "fashion_mnist": (_tfds("fashion_mnist"), "TFDS Fashion-MNIST; " + _PART),
    "emnist": (_tfds("emnist"), "TFDS EMNIST byclass|letters|digits (`emnist:letters`); " + _PART),
    "cifar10": (_tfds("cifar10"), "TFDS CIFAR-10; " + _PART),
    "cifar100": (_tfds("cifar100"), "TFDS CIFAR-100; " + _PART),
    "svhn": (_tfds("svhn"), "TFDS SVHN (cropped digits); " + _PART),
    "leaf": (_leaf, "LEAF JSON dir (FEMNIST, Shakespeare, Sent140, CelebA, Synthetic): `leaf:/path`"),
    "sqlite": (_sqlite, "FedJAX SQLite (EMNIST, Shakespeare, Stack Overflow): `sqlite:/path/x_train.sqlite`"),
    "npz": (_npz, ".npz of x, y, client_id (optional *_test): `npz:/path/data.npz`"),
    "hf": (_hf, "Hugging Face dataset dir (save_to_disk), Flower Datasets' partitioners: "
                "`hf:/path,label=label,features=img,dirichlet=0.3,clients=100` or `natural=writer_id`"),
}


def parse_spec(spec: str):
    """'name:a,b,k=v' -> ('name', ['a', 'b'], {'k': 'v'})."""
    name, _, rest = spec.partition(":")
    args, kwargs = [], {}
    for part in filter(None, (p.strip() for p in rest.split(","))) if rest else []:
        if "=" in part:
            k, v = part.split("=", 1)
            kwargs[k.strip()] = v.strip()
        else:
            args.append(part)
    return name.strip().lower(), args, kwargs


def _parse_value(v: str):
    if isinstance(v, str):
        low = v.lower()
        if low in ("true", "false"):
            return low == "true"
        for cast in (int, float):
            try:
                return cast(v)
            except ValueError:
                pass
    return v


def load(spec: str, *, seed: int = 0, **options):
    """Resolve a dataset spec string (plus keyword options, which override the spec's) to
    FederatedArrays. Unknown names or options raise ValueError listing the valid ones."""
    name, args, kwargs = parse_spec(spec)
    if name not in LOADERS:
        raise ValueError(f"unknown dataset {name!r}; valid datasets: {sorted(LOADERS)}")
    kwargs.update({k: v for k, v in options.items() if v is not None})
    domains = kwargs.pop("domains", None)
    data = LOADERS[name][0](args, kwargs, seed)
    if domains is None:
        return data
    from fedjax_lab.data.shift import feature_shift
    return feature_shift(data, _parse_value(domains), seed=seed)
