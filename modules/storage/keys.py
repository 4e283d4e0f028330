"""Object keys: every artifact lives under `users/{user_id}/...`, checked before any I/O.

Every key the service writes is built here, nowhere else:

  users/{user}/models/{model_id}/model.{pt,skops,onnx}, meta.json     uploads (model_key)
  users/{user}/inputs/{inputs_id}/inputs.npz, meta.json               inputs files
  users/{user}/{profile}/{job_id}/{i:02d}-{step}/...                  step outputs
  users/{user}/{profile}/{job_id}/report.json                         the job's report
  users/{user}/records/{job_id}/{i:04d}.json                          oversized step records
"""

from __future__ import annotations

import re

from modules.errors import BadInputError

MAX_KEY_LENGTH = 1024
# The shape of a server-made id (a model, an inputs file); ids are key segments.
ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
INPUTS_ID_PATTERN = ID_PATTERN
INPUTS_FILE = "inputs.npz"
META_FILE = "meta.json"

_USER_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SEGMENT = re.compile(r"[A-Za-z0-9._=-]+")
_INPUTS_ID = re.compile(INPUTS_ID_PATTERN)


def _reject(key: str, rule: str) -> BadInputError:
    return BadInputError(f"invalid storage key {key!r}: {rule}")


def validate_user_id(user_id: str) -> str:
    """Return `user_id` if it matches `^[A-Za-z0-9_-]{1,64}$`, else raise BadInputError."""
    if not isinstance(user_id, str) or not _USER_ID.fullmatch(user_id):
        raise BadInputError(f"invalid user id {user_id!r}: must match ^[A-Za-z0-9_-]{{1,64}}$")
    return user_id


def validate_key(key: str) -> str:
    """Return `key` if it is a safe `users/{user_id}/...` key, else raise BadInputError."""
    if not isinstance(key, str):
        raise BadInputError(f"invalid storage key {key!r}: must be a string")
    if len(key) > MAX_KEY_LENGTH:
        raise _reject(key, f"longer than {MAX_KEY_LENGTH} characters")
    if "\\" in key:
        raise _reject(key, "contains a backslash")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in key):
        raise _reject(key, "contains NUL or a control character")
    if key.startswith("/"):
        raise _reject(key, "starts with '/'")
    segments = key.split("/")
    if segments[0] != "users":
        raise _reject(key, "must start with 'users/'")
    if len(segments) < 3:
        raise _reject(key, "needs 'users/{user_id}/' and at least one more segment")
    for segment in segments:
        if segment == "":
            raise _reject(key, "has an empty segment")
        if segment in (".", ".."):
            raise _reject(key, "has a '.' or '..' segment")
    if not _USER_ID.fullmatch(segments[1]):
        raise _reject(key, "user id must match ^[A-Za-z0-9_-]{1,64}$")
    for segment in segments[2:]:
        if not _SEGMENT.fullmatch(segment):
            raise _reject(key, f"segment {segment!r} must match [A-Za-z0-9._=-]+")
    return key


def user_prefix(user_id: str) -> str:
    """Return the key prefix `users/{user_id}/` for a validated user id."""
    return f"users/{validate_user_id(user_id)}/"


def key_in_user(key: str, user_id: str) -> bool:
    """Return True if `key` is a valid key under `users/{user_id}/`."""
    try:
        validate_key(key)
        prefix = user_prefix(user_id)
    except BadInputError:
        return False
    return key.startswith(prefix)


# --- builders ------------------------------------------------------------------------------------


def models_prefix(user_id: str) -> str:
    """Where a user's uploaded models live."""
    return f"{user_prefix(user_id)}models/"


def model_key(user_id: str, model_id: str, suffix: str) -> str:
    """The key of an uploaded (or locally imported) model file, e.g. `.../model.pt`."""
    return f"{models_prefix(user_id)}{model_id}/model{suffix}"


def model_meta_key(user_id: str, model_id: str) -> str:
    """The key of an uploaded model's meta.json."""
    return f"{models_prefix(user_id)}{model_id}/{META_FILE}"


def check_inputs_id(inputs_id: str) -> str:
    """Return an inputs id if it has the shape of a server-generated one."""
    if not isinstance(inputs_id, str) or not _INPUTS_ID.fullmatch(inputs_id):
        raise BadInputError(f"invalid inputs id {inputs_id!r}: must match {INPUTS_ID_PATTERN}")
    return inputs_id


def inputs_prefix(user_id: str) -> str:
    """Where a user's inputs files live."""
    return f"{user_prefix(user_id)}inputs/"


def inputs_key(user_id: str, inputs_id: str) -> str:
    """The store key of a user's inputs file."""
    return f"{inputs_prefix(user_id)}{check_inputs_id(inputs_id)}/{INPUTS_FILE}"


def inputs_meta_key(user_id: str, inputs_id: str) -> str:
    """The key of an inputs file's meta.json."""
    return f"{inputs_prefix(user_id)}{inputs_id}/{META_FILE}"


def job_prefix(*, user_id: str, profile: str, job_id: str) -> str:
    """Where a job's outputs live: `users/{user}/{profile}/{job_id}/`."""
    return f"{user_prefix(user_id)}{profile}/{job_id}/"


def step_prefix(*, user_id: str, profile: str, job_id: str, index: int, step: str) -> str:
    """Where step `index` of a job writes: `users/{user}/{profile}/{job}/{i:02d}-{step}/`."""
    return f"{job_prefix(user_id=user_id, profile=profile, job_id=job_id)}{index:02d}-{step}/"


def job_report_key(*, user_id: str, profile: str, job_id: str) -> str:
    """Where a job's report.json lives: beside its step folders."""
    return f"{job_prefix(user_id=user_id, profile=profile, job_id=job_id)}report.json"


def record_overflow_key(*, user_id: str, job_id: str, index: int) -> str:
    """Where an oversized step record's JSON lives (DynamoDB items are capped at 400 KB)."""
    return f"{user_prefix(user_id)}records/{job_id}/{index:04d}.json"
