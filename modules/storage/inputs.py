"""Inputs files for bring-your-own ONNX models: named arrays checked against the graph's inputs.

An inputs file is a `.npz` of named arrays, one per model input, each with the sample axis
first. It is read with `allow_pickle=False` (an object array is refused by name), its member
count and decompressed size are bounded before any array is read, and every array must be
numeric or bool and finite. `check_inputs` matches the arrays to the ONNX graph's declared
inputs: names, rank, fixed dims, symbolic dims shared between inputs (`seq` of input_ids and
attention_mask) and dtype kind; every mismatch is an IncompatibleError naming the input.

A model with the standard shape (one float input of shape (batch, n_features)) can use a
dataset split instead of a file (`dataset_feeds`); any other model needs a file.

Uploaded inputs live at `users/{user}/inputs/{inputs_id}/inputs.npz`, a key built (by
modules.storage.keys) from the job's own user id, so a job can only read its owner's inputs.
numpy only at import time: the API imports this module; onnx is imported inside the functions
that read graphs.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from modules.errors import BadInputError, IncompatibleError
from modules.storage.keys import INPUTS_FILE, inputs_key
from modules.storage.npz_reader import read_npz

# The most an inputs file may hold once decompressed: above any upload (MCAAS_MAX_UPLOAD_MB,
# 100 by default) stored uncompressed, below what a deflate bomb would make the API allocate.
MAX_INPUTS_BYTES = 128 * 1024**2
MAX_ARRAYS = 64
MAX_NAME_LENGTH = 256

_NUMERIC_KINDS = "biuf"
Dim = int | str | None


@dataclass(frozen=True)
class TensorSpec:
    """One declared graph input or output: name, numpy dtype name and shape.

    dtype None: not a plain tensor (a sequence or map), which cannot be fed from a file.
    shape None: rank unknown; a dim is an int (fixed), a str (symbolic) or None (free).
    """

    name: str
    dtype: str | None
    shape: tuple[Dim, ...] | None

    def describe(self) -> str:
        """Like `input_ids (int64 [batch, seq])`."""
        dims = (
            "?"
            if self.shape is None
            else ", ".join("?" if d is None else str(d) for d in self.shape)
        )
        return f"{self.name} ({self.dtype or 'non-tensor'} [{dims}])"

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": None if self.shape is None else list(self.shape),
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> TensorSpec:
        shape = raw.get("shape")
        return cls(str(raw["name"]), raw.get("dtype"), None if shape is None else tuple(shape))


def _dim(dim: Any) -> Dim:
    if dim.HasField("dim_value"):
        return int(dim.dim_value)
    if dim.HasField("dim_param"):
        return dim.dim_param or None
    return None


def _value_specs(values: Iterable[Any]) -> list[TensorSpec]:
    from onnx import helper

    specs = []
    for value in values:
        if not value.type.HasField("tensor_type"):
            specs.append(TensorSpec(value.name, None, None))
            continue
        tensor = value.type.tensor_type
        try:
            dtype: str | None = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type)).name
        except (KeyError, TypeError, ValueError):  # undefined or exotic element types
            dtype = None
        shape = tuple(_dim(d) for d in tensor.shape.dim) if tensor.HasField("shape") else None
        specs.append(TensorSpec(value.name, dtype, shape))
    return specs


def onnx_inputs(proto: Any) -> list[TensorSpec]:
    """The graph inputs a caller must feed (initializers listed as inputs excluded)."""
    initializers = {t.name for t in proto.graph.initializer}
    return _value_specs(i for i in proto.graph.input if i.name not in initializers)


def onnx_outputs(proto: Any) -> list[TensorSpec]:
    """The graph's declared outputs."""
    return _value_specs(proto.graph.output)


def is_standard(specs: list[TensorSpec]) -> bool:
    """One float input of rank 2 (batch, n_features): what a dataset split can feed."""
    if len(specs) != 1 or specs[0].dtype is None:
        return False
    spec = specs[0]
    return np.dtype(spec.dtype).kind == "f" and (spec.shape is None or len(spec.shape) == 2)


# --- reading a file ------------------------------------------------------------------------------


def _check_name(name: str, where: str) -> str:
    if not name or len(name) > MAX_NAME_LENGTH:
        raise BadInputError(f"{where}: array name {name[:40]!r} must have 1 to 256 characters")
    if any(unicodedata.category(ch).startswith("C") for ch in name):
        raise BadInputError(f"{where}: array name {name[:40]!r} contains control characters")
    return name


def read_inputs(data: bytes, *, name: str = INPUTS_FILE) -> dict[str, np.ndarray]:
    """Parse `.npz` bytes into name -> array, refusing pickles, object arrays and bombs."""
    if len(data) > MAX_INPUTS_BYTES:
        raise BadInputError(f"inputs file {name} is {len(data):,} bytes, over {MAX_INPUTS_BYTES:,}")
    arrays = read_npz(
        data, what=f"inputs file {name}", max_bytes=MAX_INPUTS_BYTES, max_arrays=MAX_ARRAYS
    )
    where = f"inputs file {name}"
    return {_check_name(key, where): _check_array(arr, key, name) for key, arr in arrays.items()}


def _check_array(arr: np.ndarray, key: str, name: str) -> np.ndarray:
    if arr.dtype.kind not in _NUMERIC_KINDS:
        raise BadInputError(
            f"inputs file {name}: array {key!r} has dtype {arr.dtype}; only numeric and bool "
            "arrays are accepted"
        )
    if arr.ndim == 0 or arr.shape[0] == 0:
        raise BadInputError(
            f"inputs file {name}: array {key!r} has shape {arr.shape}; it needs a sample axis "
            "with at least one row"
        )
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise BadInputError(f"inputs file {name}: array {key!r} holds NaN or infinite values")
    return arr


def describe_arrays(arrays: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    """name, dtype and shape of each array: what a stored inputs file's meta records."""
    return [
        {"name": key, "dtype": arr.dtype.name, "shape": [int(d) for d in arr.shape]}
        for key, arr in arrays.items()
    ]


# --- matching arrays to a model's inputs ---------------------------------------------------------


def _layout(value: Any) -> tuple[np.dtype[Any], tuple[int, ...]]:
    """(dtype, shape) of an array or of a described one (`{"dtype", "shape"}`)."""
    if isinstance(value, np.ndarray):
        return value.dtype, tuple(value.shape)
    return np.dtype(value["dtype"]), tuple(int(d) for d in value["shape"])


def _dtype_fits(model: np.dtype[Any], given: np.dtype[Any]) -> bool:
    if model.kind == "f":
        return given.kind in "fiu"
    if model.kind in "iu":
        return given.kind in "iu"
    return model.kind == given.kind


def check_inputs(specs: list[TensorSpec], arrays: Mapping[str, Any], *, source: str) -> int:
    """Check arrays (or their descriptions) against the model's inputs; returns the row count.

    Raises IncompatibleError naming the first input that does not fit.
    """
    if not specs:
        raise IncompatibleError("the model declares no inputs to feed")
    names = [s.name for s in specs]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise IncompatibleError(
            f"model input {missing[0]!r} is missing from {source} (it holds "
            f"{', '.join(map(repr, arrays)) or 'nothing'}; the model's inputs are "
            f"{', '.join(s.describe() for s in specs)})"
        )
    extra = [n for n in arrays if n not in names]
    if extra:
        raise IncompatibleError(
            f"array {extra[0]!r} in {source} is not an input of the model (inputs: "
            f"{', '.join(map(repr, names))})"
        )
    symbols: dict[str, tuple[int, str]] = {}
    rows: tuple[int, str] | None = None
    for spec in specs:
        dtype, shape = _layout(arrays[spec.name])
        where = f"input {spec.name!r}"
        if spec.dtype is None:
            raise IncompatibleError(f"{where} is not a plain tensor; it cannot be fed from a file")
        if not _dtype_fits(np.dtype(spec.dtype), dtype):
            raise IncompatibleError(
                f"{where}: the model expects {spec.dtype}, {source} has {dtype}"
            )
        if spec.shape is not None and len(spec.shape) != len(shape):
            raise IncompatibleError(
                f"{where}: the model expects rank {len(spec.shape)} {list(spec.shape)}, {source} "
                f"has shape {list(shape)}"
            )
        if rows is not None and shape[0] != rows[0]:
            raise IncompatibleError(
                f"{where} has {shape[0]} rows but input {rows[1]!r} has {rows[0]}; every array "
                "needs the same sample count"
            )
        rows = rows or (shape[0], spec.name)
        for axis, (want, got) in enumerate(zip(spec.shape or (), shape, strict=False)):
            if isinstance(want, int) and want > 0:
                # A fixed batch axis is fed in chunks of its size, so rows may be a multiple.
                fits = got % want == 0 if axis == 0 else got == want
                if not fits:
                    raise IncompatibleError(
                        f"{where}: dim {axis} must be {want}"
                        f"{' (or a multiple, on the batch axis)' if axis == 0 else ''}, {source} "
                        f"has {got} (shape {list(shape)})"
                    )
            elif isinstance(want, str):
                seen = symbols.setdefault(want, (got, spec.name))
                if seen[0] != got:
                    raise IncompatibleError(
                        f"{where}: dim {axis} ({want!r}) is {got} but input {seen[1]!r} has "
                        f"{want!r} = {seen[0]}"
                    )
    return rows[0] if rows else 0


def prepare_feeds(
    specs: list[TensorSpec], arrays: Mapping[str, np.ndarray], *, source: str
) -> dict[str, np.ndarray]:
    """Check arrays against the model's inputs and cast each to the declared dtype."""
    check_inputs(specs, arrays, source=source)
    feeds = {}
    for spec in specs:
        arr, dtype = arrays[spec.name], np.dtype(spec.dtype)
        if dtype.kind in "iu" and arr.dtype != dtype:
            info = np.iinfo(dtype)
            if arr.min() < info.min or arr.max() > info.max:
                raise IncompatibleError(
                    f"input {spec.name!r}: values {arr.min()}..{arr.max()} in {source} do not fit "
                    f"the model's {dtype}"
                )
        feeds[spec.name] = np.ascontiguousarray(arr, dtype=dtype)
    return feeds


def dataset_feeds(specs: list[TensorSpec], x: np.ndarray, *, dataset: str) -> dict[str, np.ndarray]:
    """Feed a dataset split to a model: one array per input, checked and cast.

    A structured split (several named inputs) feeds the inputs of the same names; a single
    array feeds a single input, reshaped when the input's per-sample dims are fixed and
    hold as many values; other models need an inputs file.
    """
    source = f"dataset {dataset}"
    if x.dtype.names:
        return prepare_feeds(specs, {n: x[n] for n in x.dtype.names}, source=source)
    if len(specs) != 1:
        raise BadInputError(
            f"the model's inputs {', '.join(s.describe() for s in specs)} cannot be fed from "
            f"{source}, which holds one array {_describe_x(x)}; give an inputs file "
            "(`inputs`: the id of a .npz with one array per input, from POST /v1/inputs) or a "
            "dataset with X_train__<input> / X_test__<input> arrays"
        )
    spec = specs[0]
    dims = _fixed_sample_dims(spec)
    if (
        spec.shape is not None
        and len(spec.shape) != x.ndim
        and dims is not None
        and int(np.prod(dims)) == int(np.prod(x.shape[1:]))
    ):
        x = x.reshape(len(x), *dims)
    return prepare_feeds(specs, {spec.name: x}, source=source)


def n_rows(feeds: Mapping[str, np.ndarray]) -> int:
    """The sample count of checked feeds."""
    return int(next(iter(feeds.values())).shape[0])


def take_rows(feeds: Mapping[str, np.ndarray], rows: Any) -> dict[str, np.ndarray]:
    """The same rows (a slice or an index array) of every array."""
    return {k: np.ascontiguousarray(v[rows]) for k, v in feeds.items()}


# --- stored inputs -------------------------------------------------------------------------------


def load_stored_inputs(
    read_bytes: Callable[[str], bytes], *, user_id: str, inputs_id: str
) -> dict[str, np.ndarray]:
    """Read and parse one of the user's stored inputs files (NotFoundError when absent)."""
    return read_inputs(read_bytes(inputs_key(user_id, inputs_id)), name=f"inputs {inputs_id}")


def read_local_inputs(path: Path) -> tuple[str, bytes]:
    """Read and check a local .npz by the upload rules; its id (content hash) and bytes."""
    import hashlib

    if not path.is_file():
        raise BadInputError(f"inputs file {path} does not exist")
    if path.stat().st_size > MAX_INPUTS_BYTES:
        raise BadInputError(f"inputs file {path} is over {MAX_INPUTS_BYTES:,} bytes")
    data = path.read_bytes()
    read_inputs(data, name=path.name)
    return hashlib.sha256(data).hexdigest()[:20], data


def stage_inputs_file(workspace: Path, path: Path) -> str:
    """Validate a local .npz and put it in a LocalWorkspace's store as user `local`; its id."""
    from modules.storage.artifacts import LocalStore

    inputs_id, data = read_local_inputs(path)
    LocalStore(workspace / "store").put_bytes(inputs_key("local", inputs_id), data)
    return inputs_id


def as_named_inputs(feeds: Mapping[str, np.ndarray]) -> np.ndarray:
    """One structured array, a field per input in the given order, from equal-length arrays."""
    fields = [(name, arr.dtype, arr.shape[1:]) for name, arr in feeds.items()]
    out = np.empty(n_rows(feeds), dtype=fields)
    for name, arr in feeds.items():
        out[name] = arr
    return out


# --- shaping a dataset for a model ---------------------------------------------------------------


def torch_input_specs(meta: Mapping[str, Any]) -> list[TensorSpec] | None:
    """A torch model's inputs with the batch axis first: meta["inputs"], else a flat width.

    meta["inputs"] lists per-sample dims (batch excluded, None = dynamic); a zoo model
    records only `in_features` (flat float input); None when the meta says neither.
    """
    declared = meta.get("inputs")
    if declared:
        return [
            TensorSpec(
                str(raw["name"]),
                str(raw.get("dtype") or "float32"),
                ("batch", *raw["shape"]) if raw.get("shape") is not None else None,
            )
            for raw in declared
        ]
    width = meta.get("in_features")
    return [TensorSpec("input", "float32", ("batch", int(width)))] if width else None


def model_input_specs(artifact: Any) -> list[TensorSpec] | None:
    """The inputs a model artifact declares (None: unknown, feed the dataset as it is)."""
    if artifact.framework == "onnx":
        return onnx_inputs(artifact.obj)
    if artifact.framework == "torch":
        return torch_input_specs(artifact.meta)
    width = getattr(artifact.obj, "n_features_in_", None)
    return [TensorSpec("input", "float64", ("batch", int(width)))] if width else None


def _fixed_sample_dims(spec: TensorSpec) -> tuple[int, ...] | None:
    dims = (spec.shape or ())[1:]
    if spec.shape is None or not all(isinstance(d, int) and d > 0 for d in dims):
        return None
    return tuple(int(d) for d in dims if isinstance(d, int))


def _describe_x(x: np.ndarray) -> str:
    if x.dtype.names:
        fields: dict[str, Any] = dict(x.dtype.fields or {})
        return ", ".join(
            f"{n} ({fields[n][0].base} [n, {', '.join(map(str, fields[n][0].shape))}])"
            for n in x.dtype.names
        )
    return f"X ({x.dtype} {[len(x), *x.shape[1:]]})"


def dataset_for_model(data: Any, specs: list[TensorSpec] | None) -> Any:
    """The dataset shaped for a model's inputs, or an IncompatibleError naming the input.

    A single X array feeds a single input as it is when the rank matches, else reshaped
    when the model's per-sample dims are fixed and hold as many values (flat digits into
    a (1, 8, 8) model, images into a flat model). Named inputs must match the model's
    input names; each field is checked like an inputs file (rank, fixed dims, dtype).
    """
    if not specs:
        return data
    source = f"dataset {data.name}"
    x = data.X_test
    if x.dtype.names:
        check_inputs(specs, {n: x[n] for n in x.dtype.names}, source=source)
        order = [s.name for s in specs]  # positional order of a torch model's inputs
        return replace(
            data,
            X_train=as_named_inputs({n: data.X_train[n] for n in order}),
            X_test=as_named_inputs({n: x[n] for n in order}),
        )
    if len(specs) > 1:
        raise IncompatibleError(
            f"the model takes {len(specs)} inputs ({', '.join(s.describe() for s in specs)}) "
            f"but {source} holds one array {_describe_x(x)}; save one array per input as "
            f"X_train__<input> and X_test__<input>"
        )
    spec = specs[0]
    if spec.dtype is None:
        raise IncompatibleError(f"input {spec.describe()} is not a plain tensor")
    want = np.dtype(spec.dtype)
    if want.kind in "iu" and x.dtype.kind == "f":
        # A single X array is stored as float32; integer ids are cast back when whole.
        if not all(np.array_equal(a, np.round(a)) for a in (data.X_train, data.X_test)):
            raise IncompatibleError(
                f"input {spec.describe()}: the model expects {spec.dtype}, {source} has "
                f"{_describe_x(x)} with fractional values"
            )
        data = replace(data, X_train=data.X_train.astype(want), X_test=x.astype(want))
    if spec.shape is not None and len(spec.shape) != x.ndim:
        dims = _fixed_sample_dims(spec)
        if dims is None or int(np.prod(dims)) != int(np.prod(x.shape[1:])):
            raise IncompatibleError(
                f"input {spec.describe()} cannot be fed from {source}: it has "
                f"{_describe_x(x)}, a different rank and not a reshape of the same values"
            )
        data = data.with_sample_shape(dims)
    width = spec.shape[1] if spec.shape is not None and len(spec.shape) == 2 else None
    if isinstance(width, int) and data.X_test.ndim == 2 and data.X_test.shape[1] != width:
        raise IncompatibleError(
            f"model expects {width} input features, {source} has {data.X_test.shape[1]}"
        )
    check_inputs(specs, {spec.name: data.X_test}, source=source)
    return data
