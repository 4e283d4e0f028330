"""The upload form's multipart body: one model file (size cap enforced while streaming) and a
few short text fields (CSRF token, profile, preset, dataset).

The API's own upload (`api/uploads.py`) takes the file field only; this reuses its
streaming collector and adds the named text fields, each capped at a few hundred bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request
from python_multipart.multipart import parse_options_header

from api.uploads import FILE_FIELD, Upload, _FormCollector, feed_multipart
from modules.errors import BadInputError

TEXT_FIELDS = ("csrf", "profile", "preset", "dataset")
MAX_TEXT_BYTES = 512


@dataclass
class _UiFormCollector(_FormCollector):
    """The API's collector plus the TEXT_FIELDS."""

    texts: dict[str, str] = field(default_factory=dict)
    _text_name: str | None = None

    def _headers_finished(self) -> None:
        disposition = self._headers.get(b"content-disposition", b"")
        _, options = parse_options_header(disposition)
        name = options.get(b"name", b"").decode("utf-8", "replace")
        self._text_name = None
        if name in TEXT_FIELDS and b"filename" not in options:
            if name in self.texts:
                raise BadInputError(f"the form field {name!r} appears twice")
            self._text_name = name
            return
        super()._headers_finished()

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._text_name is None:
            super()._data(data, start, end)
            return
        self._buffer += data[start:end]
        if len(self._buffer) > MAX_TEXT_BYTES:
            raise BadInputError(f"the form field {self._text_name!r} is too long")

    def _part_end(self) -> None:
        if self._text_name is not None:
            self.texts[self._text_name] = bytes(self._buffer).decode("utf-8", "replace")
            self._text_name = None
            self._buffer = bytearray()
            self.in_part = False
            return
        super()._part_end()


@dataclass
class UploadForm:
    """The parsed upload form."""

    upload: Upload
    texts: dict[str, str]


async def receive_upload_form(request: Request, *, limit: int) -> UploadForm:
    """Read the upload form: the `file` field (at most `limit` bytes) and the TEXT_FIELDS."""
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise BadInputError("send the form as multipart/form-data")
    collector = _UiFormCollector(limit=limit)
    await feed_multipart(request, boundary, collector.callbacks(), limit=limit)
    if collector.in_part or not collector.uploads:
        raise BadInputError(f"choose a model file to upload (the {FILE_FIELD!r} field is empty)")
    upload = collector.uploads[0]
    if not upload.data:
        raise BadInputError(f"the uploaded file {upload.filename!r} is empty (0 bytes)")
    return UploadForm(upload=upload, texts=collector.texts)
