"""The upload form's multipart body: one model file (size cap enforced while streaming) and a
few short text fields (CSRF token, profile, preset, dataset, the arch of a bare state_dict).

The API's own upload (`api/uploads.py`) takes the file and its `arch` field; this reuses its
streaming collector with the form's text fields, each capped at a few kilobytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request
from python_multipart.multipart import parse_options_header

from api.uploads import FILE_FIELD, Upload, _FormCollector, feed_multipart
from modules.errors import BadInputError

TEXT_FIELDS = ("csrf", "profile", "preset", "dataset", "arch")


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
    collector = _FormCollector(limit=limit, text_fields=TEXT_FIELDS)
    await feed_multipart(request, boundary, collector.callbacks(), limit=limit)
    if collector.in_part or not collector.uploads:
        raise BadInputError(f"choose a model file to upload (the {FILE_FIELD!r} field is empty)")
    upload = collector.uploads[0]
    if not upload.data:
        raise BadInputError(f"the uploaded file {upload.filename!r} is empty (0 bytes)")
    return UploadForm(upload=upload, texts=collector.texts)
