"""LocalStore: files under a root, atomic puts, keys that cannot escape."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import pytest

from modules.errors import BadInputError, NotFoundError
from modules.storage.artifacts import ArtifactStore, LocalStore, S3Store, make_store


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "root")


def _all_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_put_get_exists_size_roundtrip(store: LocalStore) -> None:
    key = "users/alice/models/m1/model.pt"
    assert not store.exists(key)
    store.put_bytes(key, b"\x00weights\xff")
    assert store.exists(key)
    assert store.get_bytes(key) == b"\x00weights\xff"
    assert store.size(key) == 9
    assert (store.root / key).read_bytes() == b"\x00weights\xff"


def test_put_overwrites_and_leaves_no_temp_files(store: LocalStore) -> None:
    key = "users/alice/a.bin"
    store.put_bytes(key, b"one")
    store.put_bytes(key, b"two-longer")
    assert store.get_bytes(key) == b"two-longer"
    assert _all_files(store.root) == [key]


def test_failed_replace_leaves_no_object_and_no_temp(
    store: LocalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = "users/alice/half.bin"

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        store.put_bytes(key, b"x" * 10_000)
    monkeypatch.undo()
    assert not store.exists(key)
    assert _all_files(store.root) == []


def test_failed_overwrite_keeps_the_old_object(
    store: LocalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = "users/alice/kept.bin"
    store.put_bytes(key, b"old")

    def broken_fsync(fd: int) -> None:
        raise OSError("io error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="io error"):
        store.put_bytes(key, b"new")
    monkeypatch.undo()
    assert store.get_bytes(key) == b"old"
    assert _all_files(store.root) == [key]


def test_missing_key_raises_not_found_naming_it(store: LocalStore) -> None:
    with pytest.raises(NotFoundError, match="users/alice/nope"):
        store.get_bytes("users/alice/nope")
    with pytest.raises(NotFoundError, match="users/alice/nope"):
        store.size("users/alice/nope")
    with pytest.raises(NotFoundError):
        store.url("users/alice/nope")


def test_directory_is_not_an_object(store: LocalStore) -> None:
    store.put_bytes("users/alice/dir/file.bin", b"1")
    assert not store.exists("users/alice/dir")
    with pytest.raises(NotFoundError):
        store.get_bytes("users/alice/dir")
    with pytest.raises(BadInputError):
        store.put_bytes("users/alice/dir", b"2")


def test_list_is_sorted_and_scoped_to_prefix(store: LocalStore) -> None:
    keys = [
        "users/alice/models/b.pt",
        "users/alice/models/a.pt",
        "users/alice/jobs/j1/0-prune/model.pt",
        "users/alice2/models/c.pt",
        "users/bob/models/d.pt",
    ]
    for key in keys:
        store.put_bytes(key, key.encode())
    models = ["users/alice/models/a.pt", "users/alice/models/b.pt"]
    assert store.list("users/alice/models/") == models
    assert store.list("users/alice/") == sorted(keys[:3])
    assert store.list("users/alice/models/a") == ["users/alice/models/a.pt"]
    assert store.list("users/alice/none/") == []
    assert store.list("users/carol/") == []


def test_list_rejects_prefixes_outside_a_user(store: LocalStore) -> None:
    for prefix in ["", "users/", "users/alice", "../", "users/alice/../bob/"]:
        with pytest.raises(BadInputError):
            store.list(prefix)


def test_delete_is_idempotent(store: LocalStore) -> None:
    key = "users/alice/x.bin"
    store.put_bytes(key, b"1")
    store.delete(key)
    assert not store.exists(key)
    store.delete(key)
    store.delete("users/alice/never/was.bin")


def test_url_is_a_file_uri_to_the_bytes(store: LocalStore) -> None:
    key = "users/alice/r.json"
    store.put_bytes(key, b"{}")
    url = store.url(key, expires_s=60)
    assert url.startswith("file://")
    assert Path(url2pathname(urlparse(url).path)).read_bytes() == b"{}"


@pytest.mark.parametrize(
    "key", ["../escape", "users/alice/../../etc/passwd", "/etc/passwd", "models/x", "users/a/\x00"]
)
def test_bad_keys_are_rejected_before_io(store: LocalStore, key: str) -> None:
    with pytest.raises(BadInputError):
        store.put_bytes(key, b"x")
    with pytest.raises(BadInputError):
        store.get_bytes(key)
    with pytest.raises(BadInputError):
        store.exists(key)
    assert _all_files(store.root) == []


def test_symlink_out_of_root_is_rejected(store: LocalStore, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (store.root / "users").mkdir()
    (store.root / "users" / "alice").symlink_to(outside)
    with pytest.raises(BadInputError, match="outside the store root"):
        store.put_bytes("users/alice/x.bin", b"x")
    assert list(outside.iterdir()) == []


def test_non_bytes_data_is_rejected(store: LocalStore) -> None:
    with pytest.raises(BadInputError, match="bytes"):
        store.put_bytes("users/alice/x", "text")  # type: ignore[arg-type]


def test_make_store_picks_the_backend(tmp_path: Path) -> None:
    local = make_store(str(tmp_path / "a"))
    assert isinstance(local, LocalStore)
    assert isinstance(local, ArtifactStore)
    assert isinstance(make_store((tmp_path / "b").as_uri()), LocalStore)
    s3 = make_store("s3://my-bucket")
    assert isinstance(s3, S3Store)
    assert s3.bucket == "my-bucket"
    with pytest.raises(BadInputError):
        make_store("s3://my-bucket/some/prefix")
    with pytest.raises(BadInputError):
        make_store("")
