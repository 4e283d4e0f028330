"""Datasets: built-in scikit-learn sets, user .npz files and MNIST IDX files.

Nothing is downloaded. Built-in sets are split 75/25, stratified, with
`random_state=seed`. Digits pixels (0..16) are scaled to [0, 1]; the tabular
sets are standardized with the train split's mean and std. Every dataset carries
a sha256 fingerprint of its arrays, so a run records exactly what it saw.

Shapes. The built-in sets are flat `(n, features)`; `digits32` is digits upscaled
(nearest neighbour) to `(n, 3, 32, 32)` for image models. A user's `.npz` keeps the
shape it was saved with: `X_train` of shape `(n, C, H, W)` stays 4-D end to end. MNIST
IDX images keep theirs too: `(n, H, W)` files load as `(n, 1, H, W)` (one channel; uint8
pixels scaled to [0, 1]), `(n, C, H, W)` files as they are, and a 2-D IDX file stays flat.

Who gets flat rows. The dataset keeps the shape; each consumer asks for what it reads.
A model with declared inputs (a `.pt2` program, an ONNX file) gets its input's shape: a
flat `(batch, H*W)` input is fed the images flattened, a `(batch, 1, H, W)` conv input
gets them as they are (`inputs.dataset_for_model`, which reshapes only when the model's
fixed dims hold the same number of values). Models the service builds, the zoo's torch
models and scikit-learn estimators, read flat rows (`Dataset.flat`); their meta records
`in_features`, so later steps feed them the same way.
A model with several named inputs (token ids + attention mask) gets one array per
input and split, named `X_train__<input>` and `X_test__<input>` (for example
`X_train__input_ids`, `X_train__attention_mask`); such a dataset holds X as a
numpy structured array, one field per input (each field keeps its own per-sample
shape and dtype), so rows are selected, batched and fingerprinted like any array.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from modules.errors import BadInputError, NotFoundError
from modules.storage.npz_reader import read_npz

BUILTIN_DATASETS = ("digits", "digits32", "iris", "wine", "breast_cancer", "synthetic")
# Separates the split from the input name in a several-input .npz: X_train__input_ids.
INPUT_KEY_SEP = "__"
MAX_DATASET_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class Dataset:
    """Train and test arrays plus where they came from.

    X has the sample axis first and any per-sample shape (float32, or int64 for a
    single integer input such as token ids), or is a structured array with one field
    per named model input. y is int64 class ids.
    """

    name: str
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    fingerprint: str
    # (channels, height, width) when the flat features are an image; else None.
    image_shape: tuple[int, int, int] | None = None

    @property
    def input_names(self) -> tuple[str, ...]:
        """The named inputs of a several-input dataset; () for a single X array."""
        return tuple(self.X_train.dtype.names or ())

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Per-sample shape of a single X array, e.g. (3, 32, 32); () for named inputs."""
        return () if self.input_names else tuple(int(d) for d in self.X_train.shape[1:])

    @property
    def n_features(self) -> int:
        """Values per sample: flat width, C*H*W of an image, the sum over named inputs."""
        if self.input_names:
            fields: dict[str, Any] = dict(self.X_train.dtype.fields or {})
            return sum(int(np.prod(fields[n][0].shape)) for n in self.input_names)
        return int(np.prod(self.sample_shape))

    def with_sample_shape(self, shape: tuple[int, ...]) -> Dataset:
        """The same data with each sample reshaped (same values, same fingerprint)."""
        return replace(
            self,
            X_train=self.X_train.reshape(len(self.X_train), *shape),
            X_test=self.X_test.reshape(len(self.X_test), *shape),
        )

    def flat(self) -> Dataset:
        """Each sample as one row of `n_features` values (what zoo models and scikit-learn
        read); a flat or several-input dataset is returned as it is."""
        if self.input_names or len(self.sample_shape) <= 1:
            return self
        return self.with_sample_shape((self.n_features,))

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
            **({"inputs": list(self.input_names)} if self.input_names else {}),
            **({"sample_shape": list(self.sample_shape)} if len(self.sample_shape) > 1 else {}),
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
    x_tr, x_te = _features(x_tr), _features(x_te)
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


def _features(x: np.ndarray) -> np.ndarray:
    """float32 for a single X array; named inputs keep int64 / bool fields as such."""
    if not x.dtype.names:
        return np.ascontiguousarray(x, dtype=np.float32)
    return np.ascontiguousarray(x)


def _named_inputs(arrays: dict[str, np.ndarray], *, where: str) -> np.ndarray:
    """One structured array, a field per named input, from arrays with equal sample counts."""
    counts = {name: len(arr) for name, arr in arrays.items()}
    if len(set(counts.values())) > 1:
        raise BadInputError(f"{where}: the inputs have different sample counts {counts}")
    fields: list[tuple[str, Any, tuple[int, ...]]] = []
    for name, arr in arrays.items():
        kind = arr.dtype.kind
        dtype = np.bool_ if kind == "b" else np.int64 if kind in "iu" else np.float32
        fields.append((name, dtype, arr.shape[1:]))
    out = np.empty(next(iter(counts.values())), dtype=fields)
    for name, arr in arrays.items():
        out[name] = arr
    return out


def _split(x: np.ndarray, y: np.ndarray, seed: int) -> tuple[np.ndarray, ...]:
    from sklearn.model_selection import train_test_split

    return tuple(train_test_split(x, y, test_size=0.25, stratify=y, random_state=seed))


def _builtin(name: str, seed: int) -> Dataset:
    from sklearn import datasets as skd

    if name == "digits":
        bunch = skd.load_digits()
        x_tr, x_te, y_tr, y_te = _split(bunch.data / 16.0, bunch.target, seed)
        return _finish(name, (x_tr, y_tr, x_te, y_te), image_shape=(1, 8, 8))
    if name == "digits32":
        bunch = skd.load_digits()
        images = (bunch.images / 16.0).astype(np.float32)
        # Nearest-neighbour 4x upscaling to 32x32, the gray channel repeated as RGB.
        big = images.repeat(4, axis=1).repeat(4, axis=2)[:, None].repeat(3, axis=1)
        x_tr, x_te, y_tr, y_te = _split(big, bunch.target, seed)
        return _finish(name, (x_tr, y_tr, x_te, y_te), image_shape=(3, 32, 32))
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


def _npz_split(npz: dict[str, np.ndarray], split: str, *, where: str) -> np.ndarray:
    """X_{split}, or the structured array of every X_{split}__<input> array."""
    key = f"X_{split}"
    prefix = key + INPUT_KEY_SEP
    named = sorted(k for k in npz if k.startswith(prefix))
    if key in npz and named:
        raise BadInputError(f"{where}: holds both {key} and {named[0]}; use one or the other")
    if key in npz:
        return _numeric(npz[key], key, where=where)
    if not named:
        raise BadInputError(
            f"{where}: missing arrays [{key!r}] (or {prefix}<input> per named model input)"
        )
    arrays = {k.removeprefix(prefix): _numeric(npz[k], k, where=where) for k in named}
    for name, arr in arrays.items():
        if not name:
            raise BadInputError(f"{where}: {prefix} needs an input name after it")
        if arr.ndim < 1:
            raise BadInputError(f"{where}: {prefix}{name} needs a sample axis")
    return _named_inputs(arrays, where=where)


def _numeric(arr: np.ndarray, key: str, *, where: str) -> np.ndarray:
    if arr.dtype.kind not in "biuf":
        raise BadInputError(f"{where}: {key} has dtype {arr.dtype}, not numeric")
    return arr


def _load_npz(path: Path) -> Dataset:
    where = f"dataset {path.name}"
    found = read_npz(path, what=where, max_bytes=MAX_DATASET_BYTES, max_arrays=64)
    missing = [k for k in ("y_train", "y_test") if k not in found]
    if missing:
        raise BadInputError(f"{where}: missing arrays {missing}")
    x_tr = _npz_split(found, "train", where=where)
    x_te = _npz_split(found, "test", where=where)
    y_tr = _numeric(found["y_train"], "y_train", where=where)
    y_te = _numeric(found["y_test"], "y_test", where=where)
    if x_tr.dtype.names or x_te.dtype.names:
        if x_tr.dtype != x_te.dtype:
            raise BadInputError(
                f"{where}: the train inputs {_layout(x_tr)} differ from the test inputs "
                f"{_layout(x_te)}"
            )
    elif x_tr.ndim < 2 or x_te.ndim < 2:
        raise BadInputError(f"{where}: X arrays need a sample axis and features")
    elif x_tr.shape[1:] != x_te.shape[1:]:
        raise BadInputError(
            f"{where}: X_train samples have shape (features) {list(x_tr.shape[1:])}, X_test "
            f"{list(x_te.shape[1:])}"
        )
    if len(x_tr) != len(y_tr) or len(x_te) != len(y_te):
        raise BadInputError(f"{where}: X and y lengths differ")
    for key, y in (("y_train", y_tr), ("y_test", y_te)):
        if (
            y.ndim != 1
            or not len(y)
            or (y.dtype.kind == "f" and not np.all(y == np.round(y)))
            or y.min() < 0
        ):
            raise BadInputError(f"{where}: {key} must be 1-D non-negative class ids")
    sample = x_tr.shape[1:]
    image = tuple(int(d) for d in sample) if len(sample) == 3 else None
    return _finish(f"npz:{path.name}", (x_tr, y_tr, x_te, y_te), image_shape=image)  # type: ignore[arg-type]


def _layout(x: np.ndarray) -> str:
    fields: dict[str, Any] = dict(x.dtype.fields or {})
    return ", ".join(f"{n} {fields[n][0].base} {list(fields[n][0].shape)}" for n in fields)


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

    where = f"IDX dataset {path.name}"
    x_tr = _idx_images(read_idx(find("train-images")), "train-images", where=where)
    y_tr = _idx_labels(read_idx(find("train-labels")), "train-labels", where=where)
    x_te = _idx_images(read_idx(find("t10k-images")), "t10k-images", where=where)
    y_te = _idx_labels(read_idx(find("t10k-labels")), "t10k-labels", where=where)
    if x_te.shape[1:] != x_tr.shape[1:]:
        raise BadInputError(
            f"{where}: train images are {list(x_tr.shape[1:])} per sample, test images "
            f"{list(x_te.shape[1:])}"
        )
    for split, x, y in (("train", x_tr, y_tr), ("t10k", x_te, y_te)):
        if len(x) != len(y):
            raise BadInputError(
                f"{where}: {split}-images holds {len(x)} samples, {split}-labels {len(y)}"
            )
    image = tuple(int(d) for d in x_tr.shape[1:]) if x_tr.ndim == 4 else None
    return _finish(f"idx:{path.name}", (x_tr, y_tr, x_te, y_te), image_shape=image)  # type: ignore[arg-type]


def _idx_images(raw: np.ndarray, what: str, *, where: str) -> np.ndarray:
    """float32 samples: (n, H, W) gains a channel axis; uint8 pixels are scaled to [0, 1]."""
    if raw.ndim not in (2, 3, 4) or not len(raw):
        raise BadInputError(
            f"{where}: {what} has shape {list(raw.shape)}; expected (n, H, W) images, "
            "(n, C, H, W) or (n, features)"
        )
    x = raw.astype(np.float32)
    if raw.dtype == np.uint8:
        x /= 255.0
    return x[:, None] if raw.ndim == 3 else x


def _idx_labels(raw: np.ndarray, what: str, *, where: str) -> np.ndarray:
    if raw.ndim != 1 or raw.dtype.kind not in "iu" or not len(raw) or raw.min() < 0:
        raise BadInputError(f"{where}: {what} must be 1-D non-negative integer class ids")
    return raw


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
