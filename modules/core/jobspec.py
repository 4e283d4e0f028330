"""The job spec: which model, which data, which budget, which steps."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from modules.core.profiles import Profile, get_profile
from modules.core.registry import get_step
from modules.errors import BadInputError, InvalidParamsError

MAX_STEPS = 50
# The profile of a job that names none (a name in modules/core/profiles.py).
DEFAULT_PROFILE = "edge-8mb"


class StepCall(BaseModel):
    """One step of a job: a registered step name and its params."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=64, description="A registered step name.")
    params: dict[str, Any] = Field(default_factory=dict, description="The step's params.")


class JobSpec(BaseModel):
    """A whole job. Validated against the registry before anything runs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    job_id: str = Field(
        default_factory=lambda: uuid.uuid4().hex[:16],
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="Job id; generated when absent.",
    )
    user_id: str = Field(
        default="local", pattern=r"^[A-Za-z0-9_-]{1,64}$", description="Owner of the job."
    )
    model: str | None = Field(
        default=None,
        max_length=1024,
        description="Store key of the input model; None when the first step is `train`.",
    )
    dataset: str = Field(
        default="digits", max_length=1024, description="Built-in name or a .npz / IDX path."
    )
    profile: str | Profile = Field(
        default=DEFAULT_PROFILE, description="Profile name or inline budget."
    )
    steps: list[StepCall] = Field(min_length=1, max_length=MAX_STEPS, description="Steps in order.")
    seed: int = Field(default=0, ge=0, le=2**31 - 1, description="Seed for splits and training.")
    repeats: int = Field(default=1, ge=1, le=20, description="Repeated runs for statistics.")

    @field_validator("profile", mode="before")
    @classmethod
    def _resolve_profile(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return Profile.model_validate({"name": "custom", **value})
        return value

    @model_validator(mode="after")
    def _check_against_registry(self) -> JobSpec:
        get_profile(self.profile)
        for i, call in enumerate(self.steps):
            step = get_step(call.name)
            try:
                step.params.model_validate(call.params)
            except ValidationError as exc:
                raise ValueError(
                    f"steps[{i}] ({call.name}): {format_validation_error(exc)}"
                ) from None
        first = get_step(self.steps[0].name)
        if self.model is None and "none" not in first.accepts:
            raise ValueError(
                f"steps[0] ({first.name}) needs an input model: set `model`, "
                "or start with the `train` step"
            )
        return self

    @property
    def profile_obj(self) -> Profile:
        return get_profile(self.profile)

    @property
    def profile_name(self) -> str:
        return self.profile_obj.name


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem, each naming the field and the value given."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        msg = err["msg"].removeprefix("Value error, ")
        if "input" in err and err["type"] not in {"missing"} and not isinstance(err["input"], dict):
            # Cap the echoed value: a hostile spec may hold a list of millions of items.
            parts.append(f"{loc}={_clip(repr(err['input']))}: {msg}")
        else:
            parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def parse_job_spec(data: dict[str, Any]) -> JobSpec:
    """Validate a job spec, turning pydantic's errors into one InvalidParamsError."""
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise InvalidParamsError(f"invalid job spec: {format_validation_error(exc)}") from None


def read_job_file(path: Path) -> dict[str, Any]:
    """A job spec file's mapping, YAML or JSON, not yet validated."""
    if not path.is_file():
        raise BadInputError(f"job file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError, RecursionError) as exc:  # deep nesting
        raise BadInputError(f"job file {path} is not valid {path.suffix[1:]}: {exc}") from None
    if not isinstance(data, dict):
        raise BadInputError(f"job file {path} must hold a mapping at the top level")
    return data


def load_job_file(path: Path) -> JobSpec:
    """Read a job spec from YAML or JSON."""
    return parse_job_spec(read_job_file(path))
