"""TFDS image classification sets as FederatedArrays, read without TensorFlow.

`tfds.data_source(name, split=...)` gives random access to a prepared ArrayRecord dataset with no
TensorFlow installed (DESIGN, "TFDS without TensorFlow"); `tensorflow_datasets` is imported only
inside `load_tfds`, so `import fedjax_lab` never pulls it in.

Supported: mnist, fashion_mnist, emnist (byclass, letters, digits), cifar10, cifar100, svhn
(TFDS `svhn_cropped`). The training split is partitioned over clients by `partition`
("iid", "dirichlet=alpha", "shards=k", "power_law=sigma" or a callable, see data.realdata); each
client's test split is either the TFDS test split partitioned with the same label skew
(`test="partition"`, default) or a held-out share of its own examples (`test="holdout"`).

Normalization, as the usual papers (and their torchvision/TFDS pipelines) do:
  "standard" (default)  uint8 / 255, then per channel (x - mean) / std with the mean and std of the
                        training split actually loaded (MNIST gives the familiar 0.1307 / 0.3081);
  "unit"                uint8 / 255, in [0, 1] (McMahan et al. 2017's MNIST);
  "none"                raw pixel values as float32.
EMNIST letters: TFDS labels the 26 letters 1..26; we shift them to 0..25 (26 classes).
EMNIST orientation: TFDS keeps the EMNIST files' transposed images (tensorflow/datasets#812, noted
in TFDS's catalog); `emnist_upright=True` (default) transposes them back to MNIST's orientation,
which matters when EMNIST is mixed or compared with MNIST, and for looking at the images.

No internet: a dataset that is not prepared under `data_dir` raises `DatasetNotPrepared` saying how
to prepare it on a machine with internet (`tfds build NAME --file_format=array_record`) and where to
copy it; we never attempt a download unless `download=True`. Images you already hold as arrays
become such a prepared copy with `save_tfds(name, {"train": (x, y), "test": (x, y)}, data_dir)`
(TFDS's own builder writing ArrayRecord, no TensorFlow, no network). A prepared copy that cannot be read
(unparsable dataset_info.json, damaged or missing shards) raises ValueError naming its folder.
"""
from __future__ import annotations

import os
from typing import Optional, Union

import numpy as np

from fedjax_lab.data.federated import FederatedArrays
from fedjax_lab.data.realdata import Partitioner, federate

# our name -> (TFDS name, label key, num_classes)
DATASETS = {
    "mnist": ("mnist", "label", 10),
    "fashion_mnist": ("fashion_mnist", "label", 10),
    "emnist": ("emnist/byclass", "label", 62),
    "emnist/byclass": ("emnist/byclass", "label", 62),
    "emnist/letters": ("emnist/letters", "label", 26),
    "emnist/digits": ("emnist/digits", "label", 10),
    "cifar10": ("cifar10", "label", 10),
    "cifar100": ("cifar100", "label", 100),
    "svhn": ("svhn_cropped", "label", 10),
}
NORMALIZATIONS = ("standard", "unit", "none")


class DatasetNotPrepared(FileNotFoundError):
    """A TFDS dataset is not prepared (as ArrayRecord) under data_dir and cannot be downloaded."""


def _where(data_dir):
    return data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"


def _how_to(tfds_name, data_dir, why):
    where = _where(data_dir)
    return (f"TFDS dataset {tfds_name!r} is not available: {why}.\n"
            f"Prepare it once on a machine with internet (needs `pip install tensorflow "
            f"tensorflow-datasets`):\n"
            f"    tfds build {tfds_name} --file_format=array_record --data_dir={where}\n"
            f"then copy {where}/{tfds_name.split('/')[0]} to this machine and pass "
            f"data_dir=... (spec option `data_dir=`, or set TFDS_DATA_DIR). "
            f"Offline alternatives that need no download: `digits`, `mnist1d`.")


def _open(tfds, tfds_name, split, data_dir, download):
    try:
        return tfds.data_source(tfds_name, split=split, data_dir=data_dir, download=download,
                                builder_kwargs={"file_format": "array_record"} if download else None)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(f"TFDS has no dataset {tfds_name!r}: {str(e).splitlines()[0]}") from None
    except (NotImplementedError, AssertionError, KeyError, FileNotFoundError, OSError,
            ConnectionError) as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, (NotImplementedError, KeyError)):
            try:
                prepared = tfds.builder(tfds_name, data_dir=data_dir).is_prepared()
            except Exception:  # the builder itself may be unreadable; the message still helps
                prepared = False
            why = ("it is prepared under data_dir as TFRecord, but random access without "
                   "TensorFlow needs ArrayRecord" if prepared else
                   f"no prepared copy under data_dir={_where(data_dir)}")
        raise DatasetNotPrepared(_how_to(tfds_name, data_dir, why)) from None
    except Exception as e:  # downloads fail with many error types when there is no network
        if download:
            raise DatasetNotPrepared(_how_to(tfds_name, data_dir,
                                             f"download failed ({type(e).__name__}: {e})")) from None
        # e.g. protobuf's ParseError for an unreadable dataset_info.json
        raise _corrupt(tfds_name, data_dir, split, e) from e


def _corrupt(tfds_name, data_dir, split, err):
    where = os.path.join(_where(data_dir), tfds_name)
    why = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return ValueError(f"TFDS dataset {tfds_name!r} at {where}: could not read its {split} split "
                      f"({type(err).__name__}: {why}); the prepared files are corrupt or "
                      f"incomplete. Expected a dataset prepared by `tfds build {tfds_name} "
                      f"--file_format=array_record` (dataset_info.json and *.array_record-* "
                      f"shards); prepare it again and copy the whole folder.")


def _read(source, label_key, tfds_name, data_dir, split):
    n = len(source)
    if n == 0:
        where = os.path.join(_where(data_dir), tfds_name)
        raise ValueError(f"TFDS dataset {tfds_name!r} at {where}: the {split} split is empty")
    try:
        first = source[0]
        x = np.empty((n,) + np.shape(first["image"]), np.uint8)
        y = np.empty((n,), np.int64)
        for i in range(n):  # record-by-record random access (host-side loading, once)
            ex = source[i]
            x[i] = ex["image"]
            y[i] = ex[label_key]
    except Exception as err:   # array_record's RuntimeError, protobuf's DecodeError, KeyError, ...
        raise _corrupt(tfds_name, data_dir, split, err) from err
    return x, y


def load_tfds(name: str, *, partition: Union[str, Partitioner] = "iid", num_clients: int = 100,
              seed: int = 0, data_dir: Optional[str] = None, test: str = "partition",
              test_fraction: float = 0.2, normalize: str = "standard",
              download: bool = False, max_examples: Optional[int] = None,
              emnist_upright: bool = True) -> FederatedArrays:
    """Load a TFDS image classification dataset partitioned over `num_clients` clients.

    `max_examples` keeps the first n training (and n test) examples, for quick experiments.
    """
    key = name.lower().replace("-", "_")
    if key.startswith("emnist_"):
        key = "emnist/" + key[len("emnist_"):]
    if key not in DATASETS:
        raise ValueError(f"unknown TFDS dataset {name!r}; valid: {sorted(DATASETS)}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {list(NORMALIZATIONS)}, got {normalize!r}")
    if max_examples is not None and max_examples <= 0:
        raise ValueError(f"max_examples must be > 0, got {max_examples}")
    tfds_name, label_key, num_classes = DATASETS[key]
    data_dir = None if data_dir is None else os.path.expanduser(str(data_dir))
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise ImportError("TFDS datasets need tensorflow-datasets: pip install "
                          "'fedjax_lab[tfds]'") from None
    train_src = _open(tfds, tfds_name, "train", data_dir, download)
    test_src = _open(tfds, tfds_name, "test", data_dir, download) if test == "partition" else None
    if max_examples is not None:
        train_src = _Head(train_src, max_examples)
        test_src = _Head(test_src, max_examples) if test_src is not None else None
    x, y = _read(train_src, label_key, tfds_name, data_dir, "train")
    x_test, y_test = (_read(test_src, label_key, tfds_name, data_dir, "test")
                      if test_src is not None else (None, None))
    if tfds_name.startswith("emnist") and emnist_upright:
        x = np.swapaxes(x, 1, 2)
        x_test = None if x_test is None else np.swapaxes(x_test, 1, 2)
    if tfds_name == "emnist/letters":
        y, y_test = _letters(y), (_letters(y_test) if y_test is not None else None)
    x, x_test = _normalize(x, x_test, normalize)
    return federate(x, y.astype(np.int32), num_clients=num_clients, partition=partition, seed=seed,
                    x_test=x_test, y_test=None if y_test is None else y_test.astype(np.int32),
                    test=test, test_fraction=test_fraction, num_classes=num_classes)


class _Head:
    def __init__(self, source, n):
        self.source, self.n = source, min(n, len(source))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.source[i]


def _letters(y):
    if y.size and (y.min() < 1 or y.max() > 26):
        raise ValueError(f"emnist/letters: expected TFDS's labels 1..26, got range "
                         f"[{y.min()}, {y.max()}]")
    return y - 1


def _normalize(x, x_test, how):
    x = x.astype(np.float32)
    x_test = None if x_test is None else x_test.astype(np.float32)
    if how == "none":
        return x, x_test
    x /= 255.0
    if x_test is not None:
        x_test /= 255.0
    if how == "standard":
        axes = tuple(range(x.ndim - 1))
        mean = x.mean(axis=axes, dtype=np.float64).astype(np.float32)
        std = x.std(axis=axes, dtype=np.float64).astype(np.float32) + 1e-7
        x = (x - mean) / std
        x_test = None if x_test is None else (x_test - mean) / std
    return x, x_test


def save_tfds(name: str, splits: dict, data_dir: str) -> str:
    """Write arrays as the prepared TFDS dataset `name` (one of DATASETS) under `data_dir`, in
    ArrayRecord format, with no TensorFlow and no network: the dataset's own TFDS builder, whose
    examples come from `splits` instead of its download ({"train": (x, y), "test": (x, y)}, x
    uint8 [n, H, W, C] in the builder's image shape, y integer labels as `load_tfds` returns them).
    Images are PNG-encoded with PIL (TFDS's own encoder needs TensorFlow). The result is read like
    a copy prepared by `tfds build NAME --file_format=array_record`: `load_tfds(name,
    data_dir=...)`, `load("NAME:...,data_dir=...")`. EMNIST images are stored transposed and
    EMNIST letters labelled 1..26, as TFDS stores them (load_tfds undoes both). Other features of
    the builder (CIFAR's "id", CIFAR-100's "coarse_label") get placeholders ("SPLIT_i", 0).
    Returns the dataset's folder (data_dir/NAME/VERSION)."""
    import io

    import tensorflow_datasets as tfds
    from PIL import Image

    key = name.lower().replace("-", "_")
    if key.startswith("emnist_"):
        key = "emnist/" + key[len("emnist_"):]
    if key not in DATASETS:
        raise ValueError(f"unknown TFDS dataset {name!r}; valid: {sorted(DATASETS)}")
    tfds_name, label_key, _ = DATASETS[key]
    base, _, config = tfds_name.partition("/")
    arrays = {}
    for split, (x, y) in splits.items():
        x, y = np.asarray(x), np.asarray(y).astype(np.int64)
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[0] != y.shape[0]:
            raise ValueError(f"splits[{split!r}]: expected uint8 images [n, H, W, C] and n labels, "
                             f"got x {x.dtype} {x.shape} and y {y.shape}")
        if base == "emnist":
            x = np.swapaxes(x, 1, 2)
        if tfds_name == "emnist/letters":
            y = y + 1
        arrays[split] = (x, y)

    def png(image):
        buf = io.BytesIO()
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
        return buf.getvalue()

    class FromArrays(tfds.builder_cls(base), skip_registration=True):
        code_path = None      # no checksums file to look up (that lookup imports importlib_resources)

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(split) for split in arrays}

        def _generate_examples(self, split):
            x, y = arrays[split]
            features = self.info.features
            for i in range(y.shape[0]):
                ex = {"image": png(x[i]), label_key: int(y[i])}
                for k, feature in features.items():
                    if k not in ex:
                        ex[k] = (f"{split}_{i}" if isinstance(feature, tfds.features.Text) else 0)
                yield i, ex

    FromArrays.name = base        # files land where the registered builder looks for them
    builder = FromArrays(data_dir=os.path.expanduser(str(data_dir)), config=config or None,
                         file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return str(builder.data_dir)
