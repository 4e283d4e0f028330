"""Object keys: every artifact lives under `users/{user_id}/...`, checked before any I/O."""

from __future__ import annotations

import re

from modules.errors import BadInputError

MAX_KEY_LENGTH = 1024

_USER_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SEGMENT = re.compile(r"[A-Za-z0-9._=-]+")


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
