"""Receive a multipart model upload as a stream, with the size cap enforced while reading.

FastAPI's UploadFile would spool the whole body before our code runs, so the body is
fed to python-multipart's streaming parser chunk by chunk instead: the request fails
with 413 the moment the file passes the cap, and nothing is stored. The client's file
name is checked and kept only as information; it never becomes part of a key.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from fastapi import Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from api.errors import PayloadTooLargeError
from modules.errors import BadInputError

FILE_FIELD = "file"
ALLOWED_SUFFIXES = (".pt", ".pth", ".pt2", ".skops", ".onnx")
# Short text fields a model upload may carry beside the file: the arch of a bare state_dict.
MODEL_TEXT_FIELDS = ("arch",)
MAX_TEXT_BYTES = 4096
INPUTS_SUFFIXES = (".npz",)
# Multipart boundaries and part headers around the file; generous but bounded.
FORM_OVERHEAD_BYTES = 64 * 1024
MAX_FILENAME_LENGTH = 255


@dataclass
class Upload:
    """The one file of an upload, and the short text fields sent with it."""

    filename: str
    data: bytes
    texts: dict[str, str] = field(default_factory=dict)


def check_filename(name: str, suffixes: tuple[str, ...] = ALLOWED_SUFFIXES) -> str:
    """Return a safe client file name or raise BadInputError saying what is wrong with it."""
    if not name:
        raise BadInputError("the upload has no file name; name it like model.pt")
    if len(name) > MAX_FILENAME_LENGTH:
        raise BadInputError(f"file name is longer than {MAX_FILENAME_LENGTH} characters")
    if "/" in name or "\\" in name or name.startswith(".."):
        raise BadInputError(f"file name {name!r} contains a path; send a bare name like model.pt")
    if any(unicodedata.category(ch).startswith("C") for ch in name):
        raise BadInputError("file name contains control or invisible characters")
    suffix = PurePosixPath(name).suffix.lower()
    if suffix not in suffixes:
        raise BadInputError(
            f"unsupported file extension {suffix or '(none)'!r}; upload one of "
            f"{', '.join(suffixes)} (pickle and joblib files are never accepted)"
        )
    return name


@dataclass
class _FormCollector:
    """python-multipart callbacks that keep exactly one `file` part, up to `limit` bytes, and
    the named `text_fields` (each at most MAX_TEXT_BYTES)."""

    limit: int
    suffixes: tuple[str, ...] = ALLOWED_SUFFIXES
    what: str = "model"
    text_fields: tuple[str, ...] = ()
    uploads: list[Upload] = field(default_factory=list)
    texts: dict[str, str] = field(default_factory=dict)
    _text_name: str | None = None
    _headers: dict[bytes, bytes] = field(default_factory=dict)
    _header_field: bytearray = field(default_factory=bytearray)
    _header_value: bytearray = field(default_factory=bytearray)
    _buffer: bytearray = field(default_factory=bytearray)
    _filename: str | None = None
    in_part: bool = False

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._field,
            "on_header_value": self._value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._data,
            "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self._headers = {}
        self._buffer = bytearray()
        self._filename = None
        self.in_part = True

    def _field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[bytes(self._header_field).lower()] = bytes(self._header_value)
        self._header_field = bytearray()
        self._header_value = bytearray()

    def _headers_finished(self) -> None:
        disposition = self._headers.get(b"content-disposition", b"")
        _, options = parse_options_header(disposition)
        name = options.get(b"name", b"").decode("utf-8", "replace")
        self._text_name = None
        if name in self.text_fields and b"filename" not in options:
            if name in self.texts:
                raise BadInputError(f"the form field {name!r} appears twice")
            self._text_name = name
            return
        if name != FILE_FIELD:
            accepted = ", ".join(repr(f) for f in self.text_fields)
            beside = f" (and optionally {accepted})" if accepted else ""
            raise BadInputError(
                f"unexpected form field {name!r}: send only the {self.what}, as the "
                f"{FILE_FIELD!r} field{beside}"
            )
        if self.uploads:
            raise BadInputError(f"send one {self.what} per upload")
        raw = options.get(b"filename")
        if raw is None:
            raise BadInputError(f"the {FILE_FIELD!r} field must be a file with a file name")
        self._filename = check_filename(raw.decode("utf-8", "replace"), self.suffixes)

    def _data(self, data: bytes, start: int, end: int) -> None:
        self._buffer += data[start:end]
        if self._text_name is not None:
            if len(self._buffer) > MAX_TEXT_BYTES:
                raise BadInputError(f"the form field {self._text_name!r} is too long")
            return
        if len(self._buffer) > self.limit:
            raise PayloadTooLargeError(f"the file is over the upload limit of {self.limit:,} bytes")

    def _part_end(self) -> None:
        if self._text_name is not None:
            self.texts[self._text_name] = bytes(self._buffer).decode("utf-8", "replace")
            self._text_name = None
            self._buffer = bytearray()
            self.in_part = False
            return
        if self._filename is not None:
            self.uploads.append(Upload(self._filename, bytes(self._buffer)))
        self._buffer = bytearray()
        self.in_part = False


async def feed_multipart(request: Request, boundary: bytes, callbacks: Any, *, limit: int) -> None:
    """Stream the body into a multipart parser, refusing it as soon as it passes the cap.

    The cap is checked while reading (FastAPI has none per file), so an endless or
    oversized body is answered 413 without being read to its end.
    """
    body_limit = limit + FORM_OVERHEAD_BYTES
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > body_limit:
        raise PayloadTooLargeError(f"the upload is over the limit of {limit:,} bytes")
    try:
        parser = MultipartParser(boundary, callbacks)
        received = 0
        async for chunk in request.stream():
            received += len(chunk)
            if received > body_limit:
                raise PayloadTooLargeError(f"the upload is over the limit of {limit:,} bytes")
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise BadInputError(f"malformed multipart body: {exc}") from None


async def receive_upload(
    request: Request,
    *,
    limit: int,
    suffixes: tuple[str, ...] = ALLOWED_SUFFIXES,
    what: str = "model",
    text_fields: tuple[str, ...] = (),
) -> Upload:
    """Read the request body as multipart/form-data with one `file` part of at most `limit`
    (and the named short text fields, returned in `Upload.texts`)."""
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise BadInputError(
            f"send the {what} as multipart/form-data with a {FILE_FIELD!r} file field"
        )
    collector = _FormCollector(limit=limit, suffixes=suffixes, what=what, text_fields=text_fields)
    await feed_multipart(request, boundary, collector.callbacks(), limit=limit)
    if collector.in_part or not collector.uploads:
        raise BadInputError(f"the body holds no complete {FILE_FIELD!r} file field")
    upload = collector.uploads[0]
    if not upload.data:
        raise BadInputError(f"the uploaded file {upload.filename!r} is empty (0 bytes)")
    upload.texts = dict(collector.texts)
    return upload
