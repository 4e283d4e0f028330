"""Datasets: built-in scikit-learn sets, user .npz files and MNIST IDX files.

Nothing is downloaded. Built-in sets are split 75/25, stratified, with
`random_state=seed`. Digits pixels (0..16) are scaled to [0, 1]; the tabular
sets are standardized with the train split's mean and std. Every dataset carries
a sha256 fingerprint of its arrays, so a run records exactly what it saw.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from modules.errors import BadInputError, NotFoundError
from modules.storage.npz_reader import read_npz

BUILTIN_DATASETS = ("digits", "iris", "wine", "breast_cancer", "synthetic")
MAX_DATASET_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class Dataset:
    """Train and test arrays (X float32 2-D, y int64) plus where they came from."""

    name: str
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    fingerprint: str
    # (channels, height, width) when the flat features are an image; else None.
    image_shape: tuple[int, int, int] | None = None

    @property
    def n_features(self) -> int:
        return int(self.X_train.shape[1])

    @property
    def n_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max()) + 1)

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "fingerprint": self.fingerprint,
            "n_train": len(self.y_train),
            "n_test": len(self.y_test),
            "n_features": self.n_features,
            "n_classes": self.n_classes,
        }


def fingerprint_arrays(*arrays: np.ndarray) -> str:
    """sha256 over each array's dtype, shape and bytes, in order."""
    digest = hashlib.sha256()
    for arr in arrays:
        arr = np.ascontiguousarray(arr)
        digest.update(str(arr.dtype).encode())
        digest.update(str(arr.shape).encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()


def _finish(
    name: str,
    arrays: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    image_shape: tuple[int, int, int] | None = None,
) -> Dataset:
    x_tr, y_tr, x_te, y_te = arrays
    x_tr = np.ascontiguousarray(x_tr, dtype=np.float32)
    x_te = np.ascontiguousarray(x_te, dtype=np.float32)
    y_tr = np.ascontiguousarray(y_tr, dtype=np.int64)
    y_te = np.ascontiguousarray(y_te, dtype=np.int64)
    return Dataset(
        name=name,
        X_train=x_tr,
        y_train=y_tr,
        X_test=x_te,
        y_test=y_te,
        fingerprint=fingerprint_arrays(x_tr, y_tr, x_te, y_te),
        image_shape=image_shape,
    )


def _split(x: np.ndarray, y: np.ndarray, seed: int) -> tuple[np.ndarray, ...]:
    from sklearn.model_selection import train_test_split

    return tuple(train_test_split(x, y, test_size=0.25, stratify=y, random_state=seed))


def _builtin(name: str, seed: int) -> Dataset:
    from sklearn import datasets as skd

    if name == "digits":
        bunch = skd.load_digits()
        x_tr, x_te, y_tr, y_te = _split(bunch.data / 16.0, bunch.target, seed)
        return _finish(name, (x_tr, y_tr, x_te, y_te), image_shape=(1, 8, 8))
    if name == "synthetic":
        x, y = skd.make_classification(
            n_samples=2000,
            n_features=32,
            n_informative=16,
            n_classes=4,
            random_state=seed,
        )
    else:
        loader = {
            "iris": skd.load_iris,
            "wine": skd.load_wine,
            "breast_cancer": skd.load_breast_cancer,
        }[name]
        bunch = loader()
        x, y = bunch.data, bunch.target
    x_tr, x_te, y_tr, y_te = _split(x, y, seed)
    mean, std = x_tr.mean(axis=0), x_tr.std(axis=0)
    std[std == 0] = 1.0
    return _finish(name, ((x_tr - mean) / std, y_tr, (x_te - mean) / std, y_te))


def _load_npz(path: Path) -> Dataset:
    required = ("X_train", "y_train", "X_test", "y_test")
    found = read_npz(
        path, what=f"dataset {path.name}", max_bytes=MAX_DATASET_BYTES, max_arrays=64, only=required
    )
    missing = [k for k in required if k not in found]
    if missing:
        raise BadInputError(f"dataset {path.name}: missing arrays {missing}")
    arrays = tuple(found[k] for k in required)
    x_tr, y_tr, x_te, y_te = arrays
    for key, arr in zip(required, arrays, strict=True):
        if arr.dtype.kind not in "biuf":
            raise BadInputError(f"dataset {path.name}: {key} has dtype {arr.dtype}, not numeric")
    if x_tr.ndim < 2 or x_te.ndim < 2:
        raise BadInputError(f"dataset {path.name}: X arrays need a sample axis and features")
    x_tr = x_tr.reshape(len(x_tr), -1)
    x_te = x_te.reshape(len(x_te), -1)
    if x_tr.shape[1] != x_te.shape[1]:
        raise BadInputError(
            f"dataset {path.name}: X_train has {x_tr.shape[1]} features, X_test {x_te.shape[1]}"
        )
    if len(x_tr) != len(y_tr) or len(x_te) != len(y_te):
        raise BadInputError(f"dataset {path.name}: X and y lengths differ")
    for key, y in (("y_train", y_tr), ("y_test", y_te)):
        if y.ndim != 1 or (y.dtype.kind == "f" and not np.all(y == np.round(y))) or y.min() < 0:
            raise BadInputError(f"dataset {path.name}: {key} must be 1-D non-negative class ids")
    return _finish(f"npz:{path.name}", (x_tr, y_tr, x_te, y_te))


_IDX_DTYPES: dict[int, Any] = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


def read_idx(path: Path) -> np.ndarray:
    """Read one MNIST IDX file (optionally gzipped)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        head = fh.read(4)
        if len(head) != 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES:
            raise BadInputError(f"{path.name} is not an IDX file (bad magic number)")
        ndim = head[3]
        if not 1 <= ndim <= 4:
            raise BadInputError(f"{path.name}: IDX rank {ndim} is not supported")
        dims = struct.unpack(f">{ndim}I", fh.read(4 * ndim))
        dtype = np.dtype(_IDX_DTYPES[head[2]])
        count = int(np.prod(dims))
        if count * dtype.itemsize > MAX_DATASET_BYTES:
            raise BadInputError(f"{path.name}: declares {dims}, over the dataset size limit")
        raw = fh.read(count * dtype.itemsize)
    if len(raw) != count * dtype.itemsize:
        raise BadInputError(f"{path.name} is truncated: declares {dims}")
    return np.frombuffer(raw, dtype=dtype).reshape(dims)


def _load_idx_dir(path: Path) -> Dataset:
    def find(prefix: str) -> Path:
        hits = sorted(p for p in path.iterdir() if p.name.startswith(prefix) and "idx" in p.name)
        if not hits:
            raise BadInputError(f"IDX dataset {path}: no file starting with {prefix!r}")
        return hits[0]

    x_tr = read_idx(find("train-images")).astype(np.float32)
    y_tr = read_idx(find("train-labels"))
    x_te = read_idx(find("t10k-images")).astype(np.float32)
    y_te = read_idx(find("t10k-labels"))
    if x_tr.ndim != 3 or x_te.shape[1:] != x_tr.shape[1:]:
        raise BadInputError(f"IDX dataset {path}: images must be (n, height, width) and match")
    height, width = x_tr.shape[1:]
    flat = (x_tr.reshape(len(x_tr), -1) / 255.0, y_tr, x_te.reshape(len(x_te), -1) / 255.0, y_te)
    return _finish(f"idx:{path.name}", flat, image_shape=(1, height, width))


@lru_cache(maxsize=16)
def _cached(ref: str, seed: int) -> Dataset:
    if ref in BUILTIN_DATASETS:
        return _builtin(ref, seed)
    path = Path(ref.removeprefix("idx:"))
    if ref.startswith("idx:") or path.is_dir():
        if not path.is_dir():
            raise NotFoundError(f"IDX dataset directory not found: {path}")
        return _load_idx_dir(path)
    if path.suffix == ".npz":
        if not path.is_file():
            raise NotFoundError(f"dataset file not found: {path}")
        return _load_npz(path)
    known = ", ".join(BUILTIN_DATASETS)
    raise NotFoundError(
        f"unknown dataset {ref!r}; use one of {known}, a .npz file or an IDX directory"
    )


def load_dataset(ref: str = "digits", *, seed: int = 0) -> Dataset:
    """A built-in dataset by name, a `.npz` path, or an IDX directory (`idx:DIR`)."""
    return _cached(ref, seed)
