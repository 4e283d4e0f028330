"""Inputs files: safe .npz parsing, and arrays matched to a graph's declared inputs by name."""

from __future__ import annotations

import io
import pickle
import zipfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from modules.errors import BadInputError, IncompatibleError, NotFoundError
from modules.storage import inputs as inputs_mod
from modules.storage.artifacts import LocalStore
from modules.storage.inputs import (
    TensorSpec,
    check_inputs,
    dataset_feeds,
    describe_arrays,
    inputs_key,
    is_standard,
    load_stored_inputs,
    onnx_inputs,
    onnx_outputs,
    prepare_feeds,
    read_inputs,
)

TOKENS = [
    TensorSpec("input_ids", "int64", ("batch", "seq")),
    TensorSpec("attention_mask", "int64", ("batch", "seq")),
]


def npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def tokens(rows: int = 4, seq: int = 6) -> dict[str, np.ndarray]:
    ids = np.arange(rows * seq, dtype=np.int64).reshape(rows, seq)
    return {"input_ids": ids, "attention_mask": np.ones((rows, seq), dtype=np.int64)}


# --- reading ---------------------------------------------------------------------------------


def test_named_arrays_round_trip_and_are_described():
    arrays = read_inputs(npz(**tokens()))
    assert sorted(arrays) == ["attention_mask", "input_ids"]
    assert np.array_equal(arrays["input_ids"], tokens()["input_ids"])
    assert describe_arrays({"x": np.zeros((3, 2), np.float32)}) == [
        {"name": "x", "dtype": "float32", "shape": [3, 2]}
    ]


def test_an_object_array_is_refused_by_name_without_unpickling():
    data = npz(ids=np.ones((2, 3), np.int64), notes=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(BadInputError, match=r"array 'notes' holds Python objects"):
        read_inputs(data, name="mine.npz")


def test_a_pickle_or_a_plain_npy_is_not_an_npz():
    with pytest.raises(BadInputError, match=r"not a \.npz \(zip\) file"):
        read_inputs(pickle.dumps({"x": [1, 2]}))
    buf = io.BytesIO()
    np.save(buf, np.ones(3))
    with pytest.raises(BadInputError, match=r"not a \.npz"):
        read_inputs(buf.getvalue())


@pytest.mark.parametrize(
    ("array", "needle"),
    [
        (np.array(["a", "b"]), "dtype <U1"),
        (np.array([1.0, np.nan], np.float32), "NaN or infinite"),
        (np.zeros((0, 3), np.float32), "at least one row"),
        (np.float32(3.0), "sample axis"),
    ],
)
def test_unusable_arrays_are_named(array, needle):
    with pytest.raises(BadInputError, match=rf"array 'x'.*{needle}|{needle}.*'x'"):
        read_inputs(npz(x=array))


def test_size_and_member_caps_are_checked_before_reading(monkeypatch):
    buf = io.BytesIO()
    np.savez_compressed(buf, x=np.zeros((64, 64), np.float32))  # 16 kB of zeros
    assert len(buf.getvalue()) < 1000
    monkeypatch.setattr(inputs_mod, "MAX_INPUTS_BYTES", 1000)
    # Compressed, the file is under the cap; its declared uncompressed size is not.
    with pytest.raises(BadInputError, match="expands to over 1,000 bytes"):
        read_inputs(buf.getvalue())
    monkeypatch.setattr(inputs_mod, "MAX_ARRAYS", 2)
    with pytest.raises(BadInputError, match="holds 3 arrays"):
        read_inputs(npz(a=np.ones(1), b=np.ones(1), c=np.ones(1)))


def test_a_zip_member_that_is_not_npy_is_refused():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("x.npy", b"")
        archive.writestr("run.sh", b"echo hi")
    with pytest.raises(BadInputError, match="'run.sh' is not a .npy"):
        read_inputs(buf.getvalue())


# --- matching arrays to a graph's inputs --------------------------------------------------------


def test_matching_arrays_pass_and_count_rows():
    assert check_inputs(TOKENS, tokens(rows=5), source="f") == 5
    described = {a["name"]: a for a in describe_arrays(tokens(rows=5))}
    assert check_inputs(TOKENS, described, source="f") == 5  # meta.json form, as the API has


@pytest.mark.parametrize(
    ("arrays", "pattern"),
    [
        ({"input_ids": np.ones((2, 3), np.int64)}, r"model input 'attention_mask' is missing"),
        ({**tokens(), "labels": np.ones(4)}, r"array 'labels' in f is not an input"),
        ({**tokens(), "input_ids": np.ones(4, np.int64)}, r"input 'input_ids'.*rank 2"),
        (
            {**tokens(), "attention_mask": np.ones((4, 5), np.int64)},
            r"input 'attention_mask': dim 1 \('seq'\) is 5 but input 'input_ids' has 'seq' = 6",
        ),
        (
            {**tokens(), "input_ids": np.ones((4, 6), np.float32)},
            r"input 'input_ids': the model expects int64, f has float32",
        ),
        (
            {**tokens(), "attention_mask": np.ones((3, 6), np.int64)},
            r"input 'attention_mask' has 3 rows but input 'input_ids' has 4",
        ),
    ],
    ids=["missing", "extra", "rank", "symbolic-dim", "dtype", "rows"],
)
def test_mismatches_are_refused_naming_the_input(arrays, pattern):
    with pytest.raises(IncompatibleError, match=pattern):
        check_inputs(TOKENS, arrays, source="f")


def test_fixed_dims_must_match_and_a_fixed_batch_takes_multiples():
    spec = [TensorSpec("x", "float32", (2, 3))]
    assert check_inputs(spec, {"x": np.ones((4, 3), np.float32)}, source="f") == 4
    with pytest.raises(IncompatibleError, match=r"input 'x': dim 1 must be 3, f has 5"):
        check_inputs(spec, {"x": np.ones((4, 5), np.float32)}, source="f")
    with pytest.raises(IncompatibleError, match=r"dim 0 must be 2 \(or a multiple"):
        check_inputs(spec, {"x": np.ones((3, 3), np.float32)}, source="f")


def test_feeds_are_cast_to_the_declared_dtype_and_range_checked():
    narrow = {k: v.astype(np.int32) for k, v in tokens().items()}
    feeds = prepare_feeds(TOKENS, narrow, source="f")
    assert all(v.dtype == np.int64 for v in feeds.values())
    spec = [TensorSpec("x", "uint8", ("batch", 2))]
    with pytest.raises(IncompatibleError, match=r"input 'x': values -1\.\.300 .* uint8"):
        prepare_feeds(spec, {"x": np.array([[-1, 300]], np.int64)}, source="f")


def test_a_dataset_feeds_only_a_standard_graph():
    standard = [TensorSpec("input", "float32", ("batch", 4))]
    assert is_standard(standard) and not is_standard(TOKENS)
    feeds = dataset_feeds(standard, np.ones((3, 4), np.float64), dataset="digits")
    assert feeds["input"].dtype == np.float32
    with pytest.raises(BadInputError, match=r"input_ids \(int64 \[batch, seq\]\).*inputs file"):
        dataset_feeds(TOKENS, np.ones((3, 4), np.float32), dataset="digits")


def test_graph_inputs_and_outputs_are_read_from_the_proto():
    weight = helper.make_tensor("W", TensorProto.FLOAT, [4, 2], np.ones(8, dtype=np.float32))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])],
        "g",
        [
            helper.make_tensor_value_info("X", TensorProto.FLOAT, ["n", 4]),
            # An initializer listed as an input is not something to feed.
            helper.make_tensor_value_info("W", TensorProto.FLOAT, [4, 2]),
        ],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, 2])],
        [weight],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(proto)
    assert onnx_inputs(proto) == [TensorSpec("X", "float32", ("n", 4))]
    assert onnx_outputs(proto) == [TensorSpec("Y", "float32", (None, 2))]
    assert TensorSpec.from_dict(onnx_inputs(proto)[0].as_dict()) == onnx_inputs(proto)[0]


# --- stored inputs -------------------------------------------------------------------------------


def test_stored_inputs_are_read_from_the_users_own_prefix(tmp_path):
    store = LocalStore(tmp_path)
    store.put_bytes(inputs_key("alice", "abc123"), npz(**tokens()))
    arrays = load_stored_inputs(store.get_bytes, user_id="alice", inputs_id="abc123")
    assert sorted(arrays) == ["attention_mask", "input_ids"]
    with pytest.raises(NotFoundError):
        load_stored_inputs(store.get_bytes, user_id="bob", inputs_id="abc123")
    with pytest.raises(BadInputError, match="invalid inputs id"):
        inputs_key("alice", "../models/x")
