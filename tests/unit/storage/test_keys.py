"""Key validation: only safe `users/{user_id}/...` keys pass."""

from __future__ import annotations

import pytest

from modules.errors import BadInputError
from modules.storage.keys import key_in_user, user_prefix, validate_key


@pytest.mark.parametrize(
    "key",
    [
        "users/alice/models/m1/model.pt",
        "users/A_b-9/x",
        "users/u/job=1/0-prune/metrics.json",
        "users/u/.hidden",
        "users/" + "u" * 64 + "/x",
    ],
)
def test_valid_keys_are_returned_unchanged(key: str) -> None:
    assert validate_key(key) == key


@pytest.mark.parametrize(
    ("key", "rule"),
    [
        ("models/m1", "users/"),
        ("/users/alice/x", "starts with '/'"),
        ("users/alice", "at least one more segment"),
        ("users/alice/", "empty segment"),
        ("users//x", "empty segment"),
        ("users/alice//x", "empty segment"),
        ("users/alice/../bob/x", "'..'"),
        ("users/alice/./x", "'.'"),
        ("users/../x", "'..'"),
        ("users/al ice/x", "user id"),
        ("users/" + "u" * 65 + "/x", "user id"),
        ("users/alice/a\\b", "backslash"),
        ("users/alice/a\x00b", "control"),
        ("users/alice/a\nb", "control"),
        ("users/alice/a\x7fb", "control"),
        ("users/alice/x y", "segment"),
        ("users/alice/na\u00efve", "segment"),
        ("users/alice/" + "a" * 1100, "longer than 1024"),
    ],
)
def test_invalid_keys_name_the_key_and_rule(key: str, rule: str) -> None:
    with pytest.raises(BadInputError) as info:
        validate_key(key)
    assert rule in str(info.value)
    assert repr(key)[:20] in str(info.value)


def test_non_string_key_is_rejected() -> None:
    with pytest.raises(BadInputError):
        validate_key(None)  # type: ignore[arg-type]


def test_user_prefix_validates_the_id() -> None:
    assert user_prefix("alice") == "users/alice/"
    with pytest.raises(BadInputError):
        user_prefix("../bob")
    with pytest.raises(BadInputError):
        user_prefix("")


def test_key_in_user_requires_the_exact_user() -> None:
    assert key_in_user("users/alice/models/m.pt", "alice")
    assert not key_in_user("users/alice2/models/m.pt", "alice")
    assert not key_in_user("users/bob/models/m.pt", "alice")
    assert not key_in_user("users/alice/../bob/m.pt", "alice")
    assert not key_in_user("users/alice/m.pt", "bad id")
