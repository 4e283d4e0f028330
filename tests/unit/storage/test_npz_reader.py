"""The bounded .npz reader: exact round trips, and every malformed member refused by name."""

from __future__ import annotations

import io
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

from modules.errors import BadInputError
from modules.storage.datasets import load_dataset
from modules.storage.inputs import read_inputs
from modules.storage.npz_reader import MAX_HEADER_BYTES, read_npz
from tests.corpus.make_corpus import hostile_npz_files, npy_bytes, npy_header, npz_with

CAP = 128 * 1024**2


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, bytes, str]]:
    return hostile_npz_files(tmp_path_factory.mktemp("npz") / "MARKER")


def read(data: bytes, **kw) -> dict[str, np.ndarray]:
    return read_npz(data, what="file t.npz", max_bytes=kw.pop("max_bytes", CAP), max_arrays=8, **kw)


def test_arrays_read_back_exactly_as_numpy_wrote_them() -> None:
    arrays = {
        "c": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
        "f": np.asfortranarray(np.arange(12, dtype=np.int16).reshape(3, 4)),
        "big": np.arange(5, dtype=">i4"),
        "flags": np.array([True, False, True]),
        "empty": np.zeros((0, 3), np.float64),
        "scalar": np.array(7, np.uint8),
    }
    for save in (np.savez, np.savez_compressed):
        buf = io.BytesIO()
        save(buf, **arrays)
        got = read(buf.getvalue())
        assert list(got) == list(arrays)
        for key, arr in arrays.items():
            assert got[key].dtype == arr.dtype and got[key].shape == arr.shape, key
            np.testing.assert_array_equal(got[key], arr)
        assert got["f"].flags.f_contiguous and got["c"].flags.writeable


def test_a_version_2_header_is_read() -> None:
    member = npy_bytes(npy_header("<i8", "(2,)"), np.array([3, 4], "<i8").tobytes(), version=2)
    np.testing.assert_array_equal(read(npz_with({"x": member}))["x"], [3, 4])


@pytest.mark.parametrize(
    "name",
    [
        "npz_8_pib.npz",
        "npz_truncated_header.npz",
        "npz_unterminated_header.npz",
        "npz_code_in_header.npz",
        "npz_truncated_data.npz",
        "npz_negative_shape.npz",
        "npz_object_header.npz",
        "npz_deflate_bomb.npz",
        "npz_deflate_bomb_lying.npz",
    ],
)
def test_hostile_members_are_refused_naming_the_problem_at_little_cost(hostile, name) -> None:
    _, data, refusal = hostile[name]
    tracemalloc.start()
    try:
        with pytest.raises(BadInputError, match="array 'X_train'|expands to over") as caught:
            read(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert refusal in str(caught.value)
    assert "Python objects" not in str(caught.value) or name == "npz_object_header.npz"
    assert peak < 4 * 1024**2, f"{name}: {peak:,} bytes allocated to refuse it"


def test_the_bombs_are_what_they_claim(hostile) -> None:
    """The 250 MB bomb really is about 250 KB, and really holds 250 MB of float32 zeros."""
    _, data, _ = hostile["npz_deflate_bomb.npz"]
    assert len(data) < 255 * 1024
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        (member,) = archive.infolist()
        assert member.file_size > 250_000_000 and member.compress_type == zipfile.ZIP_DEFLATED
    got = read_npz(data, what="bomb", max_bytes=300_000_000, max_arrays=1)["X_train"]
    assert got.shape == (62_500_000,) and not got.any()


def test_more_data_than_the_header_declares_is_refused_after_reading_the_declared_size() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("x.npy", npy_bytes(npy_header("<f8", "(4,)"), bytes(32 * 1024**2)))
    tracemalloc.start()
    try:
        with pytest.raises(BadInputError, match="array 'x': more data than its header declares"):
            read(buf.getvalue())
        assert tracemalloc.get_traced_memory()[1] < 4 * 1024**2
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(
    ("member", "needle"),
    [
        (b"not an npy", "not a .npy array (bad magic"),
        (npy_bytes(npy_header("<f8", "(1,)"), version=9), "unknown .npy format version 9"),
        (npy_bytes("{'descr': '<f8', 'shape': (1,)}"), "must be a dict of exactly"),
        (npy_bytes("[1, 2]"), "must be a dict of exactly"),
        (npy_bytes(npy_header("<U3", "(1,)"), bytes(12)), "has dtype <U3"),
        (npy_bytes(npy_header("<x9", "(1,)")), "unknown dtype '<x9'"),
        (
            npy_bytes("{'descr': [('a', '<f8')], 'fortran_order': False, 'shape': (1,)}"),
            "structured dtype",
        ),
        (npy_bytes(npy_header("<f8", "(1.5,)")), "not a non-negative int"),
        (npy_bytes(npy_header("<f8", "(True,)")), "not a non-negative int"),
        (npy_bytes(npy_header("<f8", "[2]")), "shape must be a tuple"),
        (npy_bytes(npy_header("<f8", "(1,)" * 1)[:-3] + "'x'}"), "malformed .npy header"),
        (
            npy_bytes("{'descr': '<f8', 'fortran_order': 'no', 'shape': (1,)}", bytes(8)),
            "fortran_order must be True/False",
        ),
        (b"\x93NUMPY\x01\x00" + (MAX_HEADER_BYTES + 1).to_bytes(2, "little"), "over 10000"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_malformed_headers_are_refused_by_name(member, needle) -> None:
    with pytest.raises(BadInputError, match="array 'x'") as caught:
        read(npz_with({"x": member}))
    assert needle in str(caught.value)


def test_the_cap_counts_every_array_and_only_reads_what_is_asked() -> None:
    buf = io.BytesIO()
    np.savez(buf, a=np.zeros(100, np.float64), b=np.zeros(100, np.float64))
    data = buf.getvalue()
    # 2 x (800 bytes of data + a 128-byte header): refused before reading, on the zip's sizes.
    with pytest.raises(BadInputError, match="f expands to over 1,500 bytes"):
        read_npz(data, what="f", max_bytes=1500, max_arrays=2)
    assert list(read_npz(data, what="f", max_bytes=1500, max_arrays=2, only={"a"})) == ["a"]
    with pytest.raises(BadInputError, match="holds 2 arrays, over 1"):
        read_npz(data, what="f", max_bytes=1500, max_arrays=1)


def test_zip_level_problems_are_refused() -> None:
    with pytest.raises(BadInputError, match="not a .npz \\(zip\\) file"):
        read(b"\x80\x04K\x01.")
    with pytest.raises(BadInputError, match="not a readable .npz"):
        read(b"PK\x03\x04" + bytes(50))
    with pytest.raises(BadInputError, match="'run.sh' is not a .npy"):
        read(_zip({"run.sh": b""}))
    with pytest.raises(BadInputError, match="not a .npz \\(zip\\) file"):
        read(_zip({}))  # an empty zip has no local header at all


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return buf.getvalue()


@pytest.mark.parametrize(
    "name", ["npz_8_pib.npz", "npz_truncated_header.npz", "npz_negative_shape.npz"]
)
def test_the_inputs_and_dataset_readers_use_it(hostile, name, tmp_path: Path) -> None:
    _, data, refusal = hostile[name]
    with pytest.raises(BadInputError, match="inputs file up.npz: array 'X_train'") as caught:
        read_inputs(data, name="up.npz")
    assert refusal in str(caught.value)
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(BadInputError, match=f"dataset {name}: array 'X_train'") as caught:
        load_dataset(str(path))
    assert refusal in str(caught.value)
