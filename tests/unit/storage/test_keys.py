"""Key validation: only safe `users/{user_id}/...` keys pass."""

from __future__ import annotations

import pytest

from modules.errors import BadInputError
from modules.storage import keys
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


def test_every_builder_writes_the_documented_layout_under_the_user() -> None:
    built = {
        keys.model_key("alice", "m1", ".pt"): "users/alice/models/m1/model.pt",
        keys.model_meta_key("alice", "m1"): "users/alice/models/m1/meta.json",
        keys.inputs_key("alice", "i1"): "users/alice/inputs/i1/inputs.npz",
        keys.inputs_meta_key("alice", "i1"): "users/alice/inputs/i1/meta.json",
        keys.step_prefix(
            user_id="alice", profile="edge-8mb", job_id="j1", index=3, step="prune"
        ): "users/alice/edge-8mb/j1/03-prune/",
        keys.job_report_key(
            user_id="alice", profile="edge-8mb", job_id="j1"
        ): "users/alice/edge-8mb/j1/report.json",
        keys.record_overflow_key(
            user_id="alice", job_id="j1", index=3
        ): "users/alice/records/j1/0003.json",
    }
    for key, expected in built.items():
        assert key == expected
        # A prefix is valid once a file name follows it.
        assert key_in_user(key + ("f" if key.endswith("/") else ""), "alice")


@pytest.mark.parametrize("user_id", ["../bob", "a/b", "", "x" * 65])
def test_builders_refuse_a_bad_user_id(user_id: str) -> None:
    with pytest.raises(BadInputError, match="invalid user id"):
        keys.model_key(user_id, "m1", ".pt")
    with pytest.raises(BadInputError, match="invalid user id"):
        keys.step_prefix(user_id=user_id, profile="p", job_id="j", index=0, step="s")


def test_inputs_key_refuses_an_id_that_is_not_a_segment() -> None:
    with pytest.raises(BadInputError, match="invalid inputs id"):
        keys.inputs_key("alice", "../models/x")
