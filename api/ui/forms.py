"""The upload form's multipart body: one model file (size cap enforced while streaming) and a
few short text fields (CSRF token, profile, preset, dataset, the arch of a bare state_dict,
and the compress-to-budget goal: max drop, drop kind, objective, max time).

The API's own upload (`api/uploads.py`) takes the file and its `arch` field; this reuses its
streaming collector with the form's text fields, each capped at a few kilobytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import Request
from pydantic import ValidationError
from python_multipart.multipart import parse_options_header

from api.schemas import GoalCreate
from api.uploads import FILE_FIELD, Upload, _FormCollector, feed_multipart
from modules.core.jobspec import DEFAULT_PROFILE
from modules.errors import BadInputError, InvalidParamsError
from modules.pipeline.presets import Preset

# The goal's fields the form offers besides the profile (which every preset takes).
GOAL_FIELDS = ("max_drop", "drop_kind", "objective", "max_time_s")
TEXT_FIELDS = ("csrf", "profile", "preset", "dataset", "arch", *GOAL_FIELDS)

_GOAL_LABELS = {
    "max_drop": "Largest accuracy drop (pt, or % when relative)",
    "drop_kind": "Drop is",
    "objective": "Minimize",
    "max_time_s": "Search time limit (s)",
}


@dataclass
class UploadForm:
    """The parsed upload form."""

    upload: Upload
    texts: dict[str, str]


class InvalidFormError(InvalidParamsError):
    """Form values that fail validation; `fields` maps each form field to its message, which
    names the field as the API does (`goal.max_drop: ...`), so the page shows it inline."""

    def __init__(self, fields: dict[str, str]) -> None:
        super().__init__("; ".join(fields.values()))
        self.fields = fields


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


def is_goal_preset(preset: Preset) -> bool:
    """Whether the preset is one `compress` step whose params a goal can say in full."""
    if len(preset.steps) != 1:
        return False
    name, params = preset.steps[0]
    # A preset that also sets, say, fine-tuning epochs is not a goal: keep it as its steps.
    return name == "compress" and set(params) <= set(GOAL_FIELDS)


def goal_from_form(preset: Preset, texts: dict[str, str]) -> dict[str, Any]:
    """The goal a compress-to-budget preset stands for: the form's values over its params.

    An empty field takes the preset's value, else the API's default; values stay text, for
    GoalCreate to parse and bound exactly as it does a JSON body.
    """
    goal: dict[str, Any] = dict(preset.steps[0][1])
    for name in GOAL_FIELDS:
        value = texts.get(name, "").strip()
        if value:
            goal[name] = value
    goal["profile"] = texts.get("profile") or DEFAULT_PROFILE
    return goal


def form_errors(exc: ValidationError) -> InvalidFormError:
    """A JobCreate validation error as messages per form field, each named like the API's 422
    (`goal.max_drop: Input should be ...`)."""
    fields: dict[str, str] = {}
    for err in exc.errors():
        loc = [str(part) for part in err.get("loc", ())]
        path = ".".join(loc) or "(form)"
        message = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        # goal.max_drop is the form's max_drop; goal.profile its profile; a bare model-level
        # error (no loc) goes to the top of the form.
        field = loc[-1] if loc else "form"
        fields.setdefault(field, f"{path}: {message}")
    return InvalidFormError(fields)


def goal_inputs(preset: Preset | None) -> list[dict[str, Any]]:
    """The goal fields as the form shows them: kind, choices, bounds, default and help text,
    read from GoalCreate's schema (the preset's params as defaults), so they cannot drift."""
    schema = GoalCreate.model_json_schema()["properties"]
    preset_params = dict(preset.steps[0][1]) if preset is not None else {}
    out = []
    for name in GOAL_FIELDS:
        prop = schema[name]
        item: dict[str, Any] = {
            "name": name,
            "label": _GOAL_LABELS[name],
            "help": prop.get("description", ""),
            "default": preset_params.get(name, prop.get("default")),
        }
        if "enum" in prop:
            item["choices"] = list(prop["enum"])
        else:
            # An inclusive bound is the input's min/max; an exclusive one (max_time_s > 0) is
            # left to the server, which names the field when it refuses.
            item["min"] = prop.get("minimum")
            item["max"] = prop.get("maximum")
        out.append(item)
    return out
