import gzip
import struct

import numpy as np
import pytest

from modules.errors import BadInputError, NotFoundError
from modules.storage.datasets import (
    BUILTIN_DATASETS,
    _cached,
    fingerprint_arrays,
    load_dataset,
    read_idx,
)


@pytest.mark.parametrize("name", BUILTIN_DATASETS)
def test_builtin_split_is_75_25_stratified(name):
    ds = load_dataset(name)
    n = len(ds.y_train) + len(ds.y_test)
    assert abs(len(ds.y_test) / n - 0.25) < 0.01
    assert ds.X_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    train_share = np.bincount(ds.y_train) / len(ds.y_train)
    test_share = np.bincount(ds.y_test) / len(ds.y_test)
    assert np.abs(train_share - test_share).max() < 0.03


def test_digits_shape_and_scale():
    ds = load_dataset("digits")
    assert ds.n_features == 64 and ds.n_classes == 10 and ds.image_shape == (1, 8, 8)
    assert ds.X_train.min() >= 0 and ds.X_train.max() <= 1


def test_fingerprint_is_stable_across_runs_and_changes_with_seed():
    first = load_dataset("digits", seed=0).fingerprint
    _cached.cache_clear()
    again = load_dataset("digits", seed=0).fingerprint
    assert first == again and len(first) == 64
    assert load_dataset("digits", seed=1).fingerprint != first
    a = np.arange(6, dtype=np.float32)
    assert fingerprint_arrays(a) != fingerprint_arrays(a.reshape(2, 3))


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_npz_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    p = _npz(
        tmp_path / "d.npz",
        X_train=rng.normal(size=(20, 3)),
        y_train=np.arange(20) % 2,
        X_test=rng.normal(size=(8, 3)),
        y_test=np.arange(8) % 2,
    )
    ds = load_dataset(str(p))
    assert ds.n_features == 3 and ds.n_classes == 2 and ds.name == "npz:d.npz"


def test_npz_with_object_array_is_refused(tmp_path):
    p = tmp_path / "obj.npz"
    np.savez(
        p,
        X_train=np.array([{"a": 1}], dtype=object),
        y_train=np.zeros(1),
        X_test=np.zeros((1, 1)),
        y_test=np.zeros(1),
    )
    with pytest.raises(BadInputError, match="obj.npz"):
        load_dataset(str(p))


def test_npz_missing_array_and_mismatch(tmp_path):
    p = _npz(tmp_path / "m.npz", X_train=np.zeros((2, 2)), y_train=np.zeros(2))
    with pytest.raises(BadInputError, match="missing arrays"):
        load_dataset(str(p))
    q = _npz(
        tmp_path / "f.npz",
        X_train=np.zeros((2, 2)),
        y_train=np.zeros(2),
        X_test=np.zeros((2, 3)),
        y_test=np.zeros(2),
    )
    with pytest.raises(BadInputError, match="features"):
        load_dataset(str(q))


def test_unknown_dataset_names_known_ones(tmp_path):
    with pytest.raises(NotFoundError, match="unknown dataset 'mnist'.*digits"):
        load_dataset("mnist")
    with pytest.raises(NotFoundError, match="not found"):
        load_dataset(str(tmp_path / "nope.npz"))


def _idx(path, arr, code):
    with gzip.open(path, "wb") as fh:
        fh.write(bytes([0, 0, code, arr.ndim]))
        fh.write(struct.pack(f">{arr.ndim}I", *arr.shape))
        fh.write(arr.tobytes())


def test_idx_directory(tmp_path):
    rng = np.random.default_rng(0)
    _idx(
        tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 255, (12, 4, 4), dtype=np.uint8), 8
    )
    _idx(tmp_path / "train-labels-idx1-ubyte.gz", (np.arange(12) % 3).astype(np.uint8), 8)
    _idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 255, (6, 4, 4), dtype=np.uint8), 8)
    _idx(tmp_path / "t10k-labels-idx1-ubyte.gz", (np.arange(6) % 3).astype(np.uint8), 8)
    ds = load_dataset(f"idx:{tmp_path}")
    assert ds.n_features == 16 and ds.image_shape == (1, 4, 4) and ds.X_train.max() <= 1


def test_truncated_idx_is_refused(tmp_path):
    p = tmp_path / "x-idx1-ubyte"
    p.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 100) + b"\x01" * 10)
    with pytest.raises(BadInputError, match="truncated"):
        read_idx(p)
    p.write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(BadInputError, match="magic"):
        read_idx(p)
