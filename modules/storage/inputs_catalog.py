"""The inputs catalogue: uploaded files, users/{user}/inputs/{inputs_id}/{inputs.npz, meta.json}.

An inputs file feeds a bring-your-own ONNX model whose inputs a dataset cannot feed (token
ids, several named inputs): onnx_parity and onnx_quantize take its id as `inputs`. It is
parsed with allow_pickle=False before anything is stored, and meta.json (written last, as
for models) records each array's name, dtype and shape, so a job can be checked against
the model's declared inputs at submission, before anything runs.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from modules.core.jobspec import StepCall
from modules.errors import BadInputError, IncompatibleError, NotFoundError
from modules.storage import keys
from modules.storage.artifacts import ArtifactStore
from modules.storage.inputs import (
    TensorSpec,
    check_inputs,
    describe_arrays,
    is_standard,
    read_inputs,
)
from modules.storage.keys import ID_PATTERN, inputs_key, inputs_prefix
from modules.storage.model_catalog import list_owned_metas, read_owned_meta, store_with_meta

_ID = re.compile(ID_PATTERN)
INPUTS_PARAMS = ("inputs", "calibration_inputs")


def inputs_meta_key(user_id: str, inputs_id: str) -> str:
    """The key of an inputs file's meta.json; NotFoundError for an id that cannot exist."""
    if not _ID.fullmatch(inputs_id):
        raise NotFoundError(f"inputs {inputs_id!r} not found")
    return keys.inputs_meta_key(user_id, inputs_id)


def validate_inputs_bytes(data: bytes, filename: str) -> list[dict[str, Any]]:
    """Parse the .npz safely; returns each array's name, dtype and shape."""
    return describe_arrays(read_inputs(data, name=filename))


def save_inputs(
    store: ArtifactStore,
    *,
    user_id: str,
    filename: str,
    data: bytes,
    arrays: list[dict[str, Any]],
) -> dict[str, Any]:
    """Store a validated inputs file and its meta.json; return the meta."""
    inputs_id = uuid.uuid4().hex[:20]
    key = inputs_key(user_id, inputs_id)
    meta: dict[str, Any] = {
        "id": inputs_id,
        "user_id": user_id,
        "key": key,
        "filename": filename,
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "created_at": datetime.now(UTC).isoformat(timespec="microseconds"),
        "rows": int(arrays[0]["shape"][0]),
        "arrays": arrays,
    }
    store_with_meta(
        store, key=key, data=data, meta_key=inputs_meta_key(user_id, inputs_id), meta=meta
    )
    return meta


def get_inputs_meta(store: ArtifactStore, *, user_id: str, inputs_id: str) -> dict[str, Any]:
    """The meta of one of the user's inputs files; NotFoundError for unknown or foreign ids."""
    key = inputs_meta_key(user_id, inputs_id)
    return read_owned_meta(store, key, user_id=user_id, label=f"inputs {inputs_id!r}")


def list_inputs_metas(store: ArtifactStore, *, user_id: str) -> list[dict[str, Any]]:
    """The user's inputs files, newest first."""
    return list_owned_metas(store, inputs_prefix(user_id), user_id=user_id)


def _runs_on_data(call: StepCall) -> bool:
    """Whether a step feeds the model data (and so needs inputs a BYO graph can take)."""
    if call.name == "onnx_parity":
        return True
    return call.name == "onnx_quantize" and (
        call.params.get("search") is True or call.params.get("mode") == "static"
    )


def check_job_inputs(
    store: ArtifactStore,
    *,
    user_id: str,
    model_meta: dict[str, Any] | None,
    steps: Iterable[StepCall],
) -> None:
    """Refuse a job whose inputs files are unknown or do not fit the uploaded ONNX model.

    Raises NotFoundError (404) for an unknown inputs id, IncompatibleError (422) naming the
    input that does not fit, BadInputError (400) when a step would feed a graph that a
    dataset cannot feed and no inputs file is given.
    """
    raw_specs = (model_meta or {}).get("inputs")
    specs = [TensorSpec.from_dict(s) for s in raw_specs] if raw_specs else None
    for i, call in enumerate(steps):
        for param in INPUTS_PARAMS:
            ref = call.params.get(param)
            if not isinstance(ref, str):
                continue  # absent, or a wrong type the step's params model reports by name
            meta = get_inputs_meta(store, user_id=user_id, inputs_id=ref)
            if specs is not None:
                arrays = {a["name"]: a for a in meta["arrays"]}
                check_inputs(specs, arrays, source=f"inputs {ref} (steps[{i}].params.{param})")
        fed_by_dataset = specs is None or is_standard(specs)
        if not fed_by_dataset and _runs_on_data(call) and call.params.get("inputs") is None:
            described = ", ".join(s.describe() for s in specs or [])
            raise BadInputError(
                f"steps[{i}] ({call.name}) runs the model on data, and its inputs "
                f"{described} are not one float feature tensor a dataset can feed; upload "
                "an inputs file (.npz, one array per input) with POST /v1/inputs and give "
                f"its id as steps[{i}].params.inputs"
            )


def check_job_dataset(model_meta: dict[str, Any] | None, *, dataset: str) -> None:
    """Refuse a job whose built-in dataset does not have the features its model takes.

    Raises IncompatibleError (422) naming both counts, so the mismatch is answered at
    submission instead of as a FAILED job. Models that declare no feature count (ONNX
    graphs with their own inputs, models with N-D inputs) are checked by their steps.
    """
    in_features = (model_meta or {}).get("in_features")
    if not isinstance(in_features, int) or isinstance(in_features, bool):
        return
    from modules.storage.datasets import load_dataset

    data = load_dataset(dataset)
    if data.X_train.ndim == 2 and data.n_features != in_features:
        raise IncompatibleError(
            f"dataset {dataset!r} has {data.n_features} features per row, but the model "
            f"takes {in_features}; choose a dataset the model was trained for"
        )
