"""The model catalogue: uploads in the store, users/{user}/models/{model_id}/{model.*, meta.json}.

meta.json is written last and is what makes a model exist: a crash between the two
puts leaves an orphan file no listing shows, never a half-registered model.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from datetime import UTC, datetime
from typing import Any

from modules.core.artifact import ModelArtifact
from modules.errors import NotFoundError
from modules.storage.artifacts import ArtifactStore
from modules.storage.keys import ID_PATTERN, model_key, model_meta_key, models_prefix

_ID = re.compile(ID_PATTERN)
FORMAT_OF = {"torch": "torch-checkpoint", "sklearn": "skops", "onnx": "onnx"}
# meta["format"] of a torch artifact -> the catalogue's format name.
TORCH_FORMAT_OF = {"pt2": "torch-export"}


def meta_key(user_id: str, model_id: str) -> str:
    """The key of a model's meta.json; NotFoundError for an id that cannot exist."""
    if not _ID.fullmatch(model_id):
        raise NotFoundError(f"model {model_id!r} not found")
    return model_meta_key(user_id, model_id)


def validate_model_bytes(data: bytes, filename: str, arch: str | None = None) -> ModelArtifact:
    """Load the bytes through the foundation's safe loaders (imports torch/skops/onnx lazily).

    `arch` names the architecture of a bare state_dict upload (see model_formats.parse_arch).
    """
    from modules.storage.model_formats import load_model

    # Uploads are never trusted to unpickle code, whatever MCAAS_TRUST_PICKLE says.
    return load_model(data, filename=filename, trust_pickle=False, arch=arch)


def _format_of(artifact: ModelArtifact) -> str:
    fmt = artifact.meta.get("format")
    if artifact.framework == "torch" and isinstance(fmt, str) and fmt in TORCH_FORMAT_OF:
        return TORCH_FORMAT_OF[fmt]
    return FORMAT_OF[artifact.framework]


def save_upload(
    store: ArtifactStore,
    *,
    user_id: str,
    filename: str,
    data: bytes,
    artifact: ModelArtifact,
    arch: str | None = None,
) -> dict[str, Any]:
    """Store a validated upload and its meta.json; return the meta.

    A bare state_dict uploaded with an `arch` is stored as the checkpoint it makes
    ({"arch", "state_dict"}), so every later load finds its architecture in the file.
    """
    if arch is not None:
        from modules.storage.model_formats import save_model

        data = save_model(artifact)
    model_id = uuid.uuid4().hex[:20]
    key = model_key(user_id, model_id, artifact.suffix)
    meta: dict[str, Any] = {
        "id": model_id,
        "user_id": user_id,
        "key": key,
        "filename": filename,
        "format": _format_of(artifact),
        "framework": artifact.framework,
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "created_at": datetime.now(UTC).isoformat(timespec="microseconds"),
        "in_features": _int_or_none(artifact.meta.get("in_features")),
        "num_classes": _int_or_none(artifact.meta.get("num_classes")),
    }
    if artifact.framework == "onnx":
        from modules.storage.inputs import onnx_inputs, onnx_outputs

        # Kept so a job can be checked against an inputs file before anything runs.
        meta["inputs"] = [spec.as_dict() for spec in onnx_inputs(artifact.obj)]
        meta["outputs"] = [spec.as_dict() for spec in onnx_outputs(artifact.obj)]
    store_with_meta(store, key=key, data=data, meta_key=meta_key(user_id, model_id), meta=meta)
    return meta


def store_with_meta(
    store: ArtifactStore, *, key: str, data: bytes, meta_key: str, meta: dict[str, Any]
) -> None:
    """Store the bytes, then their meta.json; the meta is what makes an upload exist.

    If the meta cannot be written the bytes are removed, so nothing is half-stored.
    """
    store.put_bytes(key, data)
    try:
        store.put_bytes(meta_key, json.dumps(meta, sort_keys=True).encode())
    except BaseException:
        store.delete(key)
        raise


def read_owned_meta(store: ArtifactStore, key: str, *, user_id: str, label: str) -> dict[str, Any]:
    """A meta.json owned by `user_id`; NotFoundError naming `label` for unknown or foreign ids."""
    try:
        meta: dict[str, Any] = json.loads(store.get_bytes(key))
    except NotFoundError:
        raise NotFoundError(f"{label} not found") from None
    if meta.get("user_id") != user_id:
        raise NotFoundError(f"{label} not found")
    return meta


def list_owned_metas(store: ArtifactStore, prefix: str, *, user_id: str) -> list[dict[str, Any]]:
    """Every meta.json under `prefix` owned by `user_id`, newest first."""
    metas = []
    for key in store.list(prefix):
        if key.endswith("/meta.json"):
            meta = json.loads(store.get_bytes(key))
            if meta.get("user_id") == user_id:
                metas.append(meta)
    return sorted(metas, key=lambda m: (m["created_at"], m["id"]), reverse=True)


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def get_model_meta(store: ArtifactStore, *, user_id: str, model_id: str) -> dict[str, Any]:
    """The meta of one of the user's models; NotFoundError for unknown or foreign ids."""
    key = meta_key(user_id, model_id)
    return read_owned_meta(store, key, user_id=user_id, label=f"model {model_id!r}")


def list_model_metas(store: ArtifactStore, *, user_id: str) -> list[dict[str, Any]]:
    """The user's models, newest first."""
    return list_owned_metas(store, models_prefix(user_id), user_id=user_id)
