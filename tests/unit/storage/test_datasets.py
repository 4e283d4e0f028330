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


# --- N-D samples and several named inputs -------------------------------------------------------


def test_npz_images_keep_their_shape(tmp_path):
    rng = np.random.default_rng(0)
    p = _npz(
        tmp_path / "img.npz",
        X_train=rng.random((12, 3, 8, 8)),
        y_train=np.arange(12) % 3,
        X_test=rng.random((6, 3, 8, 8)),
        y_test=np.arange(6) % 3,
    )
    ds = load_dataset(str(p))
    assert ds.X_train.shape == (12, 3, 8, 8) and ds.X_train.dtype == np.float32
    assert ds.sample_shape == (3, 8, 8) and ds.image_shape == (3, 8, 8)
    assert ds.n_features == 192
    assert ds.describe()["sample_shape"] == [3, 8, 8]


def test_npz_named_inputs_become_one_field_per_input(tmp_path):
    ids = np.arange(40, dtype=np.int64).reshape(4, 10)
    p = _npz(
        tmp_path / "tok.npz",
        X_train__input_ids=ids,
        X_train__attention_mask=np.ones((4, 10), dtype=np.int32),
        y_train=np.array([0, 1, 0, 1]),
        X_test__input_ids=ids[:2],
        X_test__attention_mask=np.ones((2, 10), dtype=np.int32),
        y_test=np.array([1, 0]),
    )
    ds = load_dataset(str(p))
    assert set(ds.input_names) == {"input_ids", "attention_mask"}
    assert ds.X_train["input_ids"].dtype == np.int64
    assert ds.X_train["attention_mask"].dtype == np.int64  # int inputs widen to int64
    np.testing.assert_array_equal(ds.X_test["input_ids"], ids[:2])
    assert ds.describe()["inputs"] == list(ds.input_names)
    assert ds.X_train[[2, 0]]["input_ids"].tolist() == [ids[2].tolist(), ids[0].tolist()]


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        (
            {"X_train__a": np.zeros((4, 2)), "X_test__b": np.zeros((2, 2))},
            "train inputs a float32 \\[2\\] differ from the test inputs b",
        ),
        ({"X_train__a": np.zeros((4, 2)), "X_train": np.zeros((4, 2))}, "holds both X_train"),
        ({"X_train__a": np.zeros((4, 2)), "X_train__b": np.zeros((3, 2))}, "different sample"),
        ({"X_train": np.zeros((4, 2, 2)), "X_test": np.zeros((2, 4))}, "samples have shape"),
    ],
)
def test_npz_with_inconsistent_inputs_is_refused_by_name(tmp_path, arrays, message):
    arrays = {"X_test__a": np.zeros((2, 2)), **arrays} if "X_test" not in arrays else arrays
    if "X_test__b" in arrays:
        arrays.pop("X_test__a")
    p = _npz(tmp_path / "bad.npz", y_train=np.zeros(4), y_test=np.zeros(2), **arrays)
    with pytest.raises(BadInputError, match=message):
        load_dataset(str(p))


def test_digits32_is_digits_upscaled_to_three_channel_32x32():
    ds = load_dataset("digits32")
    flat = load_dataset("digits")
    assert ds.X_train.shape == (len(flat.y_train), 3, 32, 32)
    np.testing.assert_array_equal(ds.y_test, flat.y_test)
    # Each 8x8 pixel becomes a 4x4 block, the same in every channel.
    first = ds.X_test[0]
    np.testing.assert_allclose(first[0, ::4, ::4].reshape(-1), flat.X_test[0], rtol=1e-6)
    np.testing.assert_array_equal(first[0], first[2])
