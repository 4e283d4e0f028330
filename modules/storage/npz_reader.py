"""Read an untrusted `.npz` with bounded memory: every `.npy` header is parsed here.

`numpy.load` trusts a member's header: it allocates the declared shape before reading
(an 8 PiB declaration is an uncaught `_ArrayMemoryError`), a truncated header surfaces as a
`tokenize.TokenError`, and truncated data or a negative shape come back as the same
`ValueError` as an object array. Here each member's header is read and checked first
(magic, version, length, a literal dict with exactly `descr`, `fortran_order`, `shape`;
a plain numeric or bool dtype; non-negative int dims), the declared size is refused above
the cap before anything is allocated, and the data is read in chunks into a buffer of
exactly the declared size, so a deflate bomb costs at most the cap, and a member whose data
is shorter or longer than its header says is refused. Every problem is a BadInputError
naming the member and what is wrong with it.
"""

from __future__ import annotations

import ast
import io
import math
import struct
import zipfile
from collections.abc import Collection
from pathlib import Path
from typing import IO, Any

import numpy as np

from modules.errors import BadInputError

NPY_MAGIC = b"\x93NUMPY"
# numpy itself refuses headers over 10000 bytes (its max_header_size); so do we.
MAX_HEADER_BYTES = 10_000
MAX_DIMS = 32
_CHUNK = 1024 * 1024
_NUMERIC_KINDS = "biuf"
_HEADER_KEYS = {"descr", "fortran_order", "shape"}


def read_npz(
    source: bytes | Path,
    *,
    what: str,
    max_bytes: int,
    max_arrays: int,
    only: Collection[str] | None = None,
) -> dict[str, np.ndarray]:
    """name -> array of an `.npz`, refusing anything malformed or over `max_bytes` in all.

    what: how errors name the file (`inputs file x.npz`, `dataset d.npz`).
    only: read just these arrays (others are left unread); None reads every member.
    """
    opened: IO[bytes] = io.BytesIO(source) if isinstance(source, bytes) else source.open("rb")
    with opened as raw:
        if raw.read(4) != b"PK\x03\x04":
            raise BadInputError(
                f"{what} is not a .npz (zip) file; save it with numpy.savez(path, name=array)"
            )
        raw.seek(0)
        try:
            archive = zipfile.ZipFile(raw)
        except (zipfile.BadZipFile, EOFError, OSError) as exc:
            raise BadInputError(f"{what} is not a readable .npz: {exc}") from None
        with archive:
            return _read_members(
                archive, what=what, max_bytes=max_bytes, max_arrays=max_arrays, only=only
            )


def _read_members(
    archive: zipfile.ZipFile,
    *,
    what: str,
    max_bytes: int,
    max_arrays: int,
    only: Collection[str] | None,
) -> dict[str, np.ndarray]:
    members = archive.infolist()
    if not members:
        raise BadInputError(f"{what} holds no arrays")
    if len(members) > max_arrays:
        raise BadInputError(f"{what} holds {len(members)} arrays, over {max_arrays}")
    # The zip's own sizes are the writer's claim: a cheap early refusal, not the bound.
    wanted = [m for m in members if only is None or m.filename[: -len(".npy")] in only]
    if sum(m.file_size for m in wanted) > max_bytes:
        raise BadInputError(f"{what} expands to over {max_bytes:,} bytes; refusing to read it")
    names = [m.filename for m in members]
    for name in names:
        if not name.endswith(".npy"):
            raise BadInputError(f"{what}: member {name[:60]!r} is not a .npy")
    if len(set(names)) != len(names):
        raise BadInputError(f"{what} holds two members with the same name")
    arrays: dict[str, np.ndarray] = {}
    budget = max_bytes
    for member in members:
        key = member.filename[: -len(".npy")]
        if only is not None and key not in only:
            continue
        try:
            with archive.open(member) as stream:
                arr = _read_npy(stream, where=f"{what}: array {key!r}", budget=budget)
        except (zipfile.BadZipFile, EOFError, OSError, zipfile.LargeZipFile) as exc:
            raise BadInputError(f"{what}: array {key!r} is unreadable: {exc}") from None
        budget -= arr.nbytes
        arrays[key] = arr
    return arrays


def _read_exact(stream: IO[bytes], n: int, *, where: str, part: str) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise BadInputError(f"{where}: truncated .npy {part} ({len(data)} of {n} bytes)")
    return data


def _read_npy(stream: IO[bytes], *, where: str, budget: int) -> np.ndarray:
    dtype, shape, fortran = read_npy_header(stream, where=where)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > budget:
        raise BadInputError(
            f"{where} declares shape {shape} of {dtype} ({nbytes:,} bytes), over the "
            f"{budget:,} bytes left under the size cap; refusing to allocate it"
        )
    buffer = bytearray(nbytes)
    view = memoryview(buffer)
    filled = 0
    while filled < nbytes:
        got = stream.readinto(view[filled : filled + _CHUNK])  # type: ignore[attr-defined]
        if not got:
            raise BadInputError(
                f"{where}: truncated data ({filled:,} of the {nbytes:,} bytes its header "
                f"declares for shape {shape})"
            )
        filled += got
    if stream.read(1):
        raise BadInputError(f"{where}: more data than its header declares for shape {shape}")
    arr = np.frombuffer(buffer, dtype=dtype)
    return arr.reshape(shape, order="F" if fortran else "C")


def read_npy_header(
    stream: IO[bytes], *, where: str
) -> tuple[np.dtype[Any], tuple[int, ...], bool]:
    """(dtype, shape, fortran_order) from a `.npy` header, checked without numpy's parser."""
    magic = stream.read(len(NPY_MAGIC))
    if magic != NPY_MAGIC:
        raise BadInputError(f"{where} is not a .npy array (bad magic {magic[:6]!r})")
    major, _minor = _read_exact(stream, 2, where=where, part="header")
    if major == 1:
        (length,) = struct.unpack("<H", _read_exact(stream, 2, where=where, part="header"))
    elif major in (2, 3):
        (length,) = struct.unpack("<I", _read_exact(stream, 4, where=where, part="header"))
    else:
        raise BadInputError(f"{where}: unknown .npy format version {major}")
    if length > MAX_HEADER_BYTES:
        raise BadInputError(f"{where}: .npy header of {length:,} bytes, over {MAX_HEADER_BYTES}")
    text_bytes = _read_exact(stream, length, where=where, part="header")
    try:
        text = text_bytes.decode("utf8" if major == 3 else "latin1")
        header = ast.literal_eval(text.strip())
    except (SyntaxError, ValueError, UnicodeDecodeError, MemoryError, RecursionError):
        raise BadInputError(
            f"{where}: malformed .npy header (not a Python literal): {text_bytes[:80]!r}"
        ) from None
    if not isinstance(header, dict) or set(header) != _HEADER_KEYS:
        raise BadInputError(
            f"{where}: malformed .npy header: it must be a dict of exactly "
            f"{sorted(_HEADER_KEYS)}, got {text_bytes[:80]!r}"
        )
    return (
        _header_dtype(header["descr"], where),
        _header_shape(header["shape"], where),
        (_header_order(header["fortran_order"], where)),
    )


def _header_dtype(descr: Any, where: str) -> np.dtype[Any]:
    if not isinstance(descr, str):
        raise BadInputError(
            f"{where} has a structured dtype {str(descr)[:80]}; only numeric and bool arrays "
            "are accepted"
        )
    try:
        dtype = np.dtype(descr)
    except (TypeError, ValueError):
        raise BadInputError(
            f"{where}: malformed .npy header: unknown dtype {descr[:40]!r}"
        ) from None
    if dtype.kind == "O" or dtype.hasobject:
        raise BadInputError(
            f"{where} holds Python objects (dtype {descr!r}, which would need pickle); only "
            "numeric and bool arrays are accepted"
        )
    if dtype.kind not in _NUMERIC_KINDS or dtype.itemsize == 0:
        raise BadInputError(f"{where} has dtype {dtype}; only numeric and bool arrays are accepted")
    return dtype


def _header_shape(shape: Any, where: str) -> tuple[int, ...]:
    if not isinstance(shape, tuple) or len(shape) > MAX_DIMS:
        raise BadInputError(
            f"{where}: malformed .npy header: shape must be a tuple of at most {MAX_DIMS} "
            f"ints, got {str(shape)[:80]}"
        )
    for dim in shape:
        if type(dim) is not int or dim < 0:
            raise BadInputError(
                f"{where}: malformed .npy header: shape {str(shape)[:80]} has a dim that is "
                "not a non-negative int"
            )
    return shape


def _header_order(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise BadInputError(f"{where}: malformed .npy header: fortran_order must be True/False")
    return value
