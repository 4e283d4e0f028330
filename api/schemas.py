"""Request and response bodies: Thing / ThingCreate / ThingPublic / ThingsPublic."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from modules.core.jobspec import DEFAULT_PROFILE, MAX_STEPS, StepCall
from modules.core.profiles import get_profile
from modules.core.records import JobStatus
from modules.storage.datasets import BUILTIN_DATASETS

# Server-generated ids are hex; anything else cannot exist and is answered with 404.
ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


class TensorPublic(BaseModel):
    """A declared graph input or output, or an array of an inputs file."""

    name: str = Field(description="Name.")
    dtype: str | None = Field(description="numpy dtype name; null: not a plain tensor.")
    shape: list[int | str | None] | None = Field(
        description="Dims: a number (fixed), a name (symbolic, like 'batch') or null."
    )


class ModelPublic(BaseModel):
    """An uploaded, validated model."""

    id: str = Field(description="Server-generated model id.")
    filename: str = Field(description="The client's file name (informational only).")
    format: Literal["torch-checkpoint", "torch-export", "skops", "onnx"] = Field(
        description="File format (torch-export: a torch.export .pt2 program)."
    )
    framework: Literal["torch", "sklearn", "onnx"] = Field(description="Model framework.")
    size: int = Field(description="Bytes stored.")
    sha256: str = Field(description="sha256 of the stored bytes (as uploaded).")
    created_at: str = Field(description="ISO-8601 UTC upload time.")
    in_features: int | None = Field(default=None, description="Input feature count.")
    num_classes: int | None = Field(default=None, description="Output class count.")
    inputs: list[TensorPublic] | None = Field(
        default=None, description="ONNX: the graph inputs a job must feed."
    )
    outputs: list[TensorPublic] | None = Field(default=None, description="ONNX: the graph outputs.")


class ModelsPublic(BaseModel):
    data: list[ModelPublic]
    count: int


class InputsPublic(BaseModel):
    """An uploaded inputs file: named arrays that feed a bring-your-own ONNX model."""

    id: str = Field(description="Server-generated id; give it as a step's `inputs` param.")
    filename: str = Field(description="The client's file name (informational only).")
    size: int = Field(description="Bytes stored.")
    sha256: str = Field(description="sha256 of the stored bytes.")
    created_at: str = Field(description="ISO-8601 UTC upload time.")
    rows: int = Field(description="Samples (the first axis of every array).")
    arrays: list[TensorPublic] = Field(description="Each array's name, dtype and shape.")


class InputsListPublic(BaseModel):
    data: list[InputsPublic]
    count: int


class GoalCreate(BaseModel):
    """Compress to a budget in one call: the job becomes one `compress` step on this goal."""

    model_config = ConfigDict(extra="forbid")

    profile: str | dict[str, Any] = Field(
        default=DEFAULT_PROFILE,
        description="Profile name (GET /v1/profiles) or an inline budget the result must fit.",
    )
    max_drop: float = Field(
        default=1.0,
        ge=0,
        le=100,
        description="Largest accuracy drop: percentage points (absolute) or percent (relative).",
    )
    drop_kind: Literal["absolute", "relative"] = Field(
        default="absolute", description="How max_drop is read."
    )
    objective: Literal["size", "latency", "energy"] = Field(
        default="size", description="What the winner minimizes among the candidates that pass."
    )
    max_time_s: float = Field(
        default=600.0, gt=0, le=86_400, description="No new candidate starts after this long."
    )

    @field_validator("profile")
    @classmethod
    def _known_profile(cls, value: str | dict[str, Any]) -> str | dict[str, Any]:
        # get_profile raises NotFoundError (unknown name) or ValidationError (bad inline
        # budget); both become a 422 at goal.profile.
        try:
            get_profile(value)
        except Exception as exc:
            raise ValueError(str(exc)) from None
        return value

    def step_call(self) -> StepCall:
        """The one `compress` step this goal stands for."""
        params = self.model_dump(include={"max_drop", "drop_kind", "objective", "max_time_s"})
        return StepCall(name="compress", params=params)


class JobCreate(BaseModel):
    """A job to run: an uploaded model (or a `train` first step), data, budget and steps.

    Give `steps`, or a `goal` (compress to a budget in one call), not both.
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_id: str | None = Field(
        default=None,
        pattern=ID_PATTERN,
        description="Id from POST /v1/models; omit when the first step is `train`.",
    )
    dataset: str = Field(default="digits", description="A built-in dataset name.")
    profile: str | dict[str, Any] = Field(
        default=DEFAULT_PROFILE, description="Profile name (GET /v1/profiles) or an inline budget."
    )
    steps: list[StepCall] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_STEPS,
        description="Steps in order (GET /v1/steps); or give `goal` instead.",
    )
    goal: GoalCreate | None = Field(
        default=None,
        description="Compress to a budget: profile, max_drop, objective, max_time_s; the job "
        "runs the `compress` step and its profile is goal.profile.",
    )
    seed: int = Field(default=0, ge=0, le=2**31 - 1, description="Seed for splits and training.")
    repeats: int = Field(default=1, ge=1, le=20, description="Repeated runs for statistics.")

    @model_validator(mode="after")
    def _steps_or_goal(self) -> JobCreate:
        if (self.steps is None) == (self.goal is None):
            raise ValueError("give either `steps` or `goal`, not both and not neither")
        if self.goal is not None and "profile" in self.model_fields_set:
            raise ValueError("with `goal`, the profile is goal.profile; drop the top-level one")
        return self

    def job_steps(self) -> list[StepCall]:
        """The steps to run: the given ones, or the goal's one `compress` step."""
        return [self.goal.step_call()] if self.goal is not None else list(self.steps or [])

    def job_profile(self) -> str | dict[str, Any]:
        return self.goal.profile if self.goal is not None else self.profile

    @field_validator("dataset")
    @classmethod
    def _builtin_only(cls, value: str) -> str:
        # Paths would read the server's file system; uploads of data are not offered yet.
        if value not in BUILTIN_DATASETS:
            raise ValueError(f"unknown dataset {value!r}; one of {', '.join(BUILTIN_DATASETS)}")
        return value


class Progress(BaseModel):
    done: int = Field(description="Steps with a record.")
    total: int = Field(description="Steps in the job.")
    current: int | None = Field(description="Index of the running step, when one runs.")
    current_step: str | None = Field(description="Name of the running step.")


class JobPublic(BaseModel):
    """A job's state; `records` (the step records) only on GET /v1/jobs/{id}."""

    model_config = ConfigDict(protected_namespaces=())

    id: str
    status: JobStatus
    reason: str | None
    progress: Progress
    model_id: str | None
    dataset: str
    profile: str | dict[str, Any]
    steps: list[StepCall]
    seed: int
    repeats: int
    attempts: int
    created_at: str
    updated_at: str
    records: list[dict[str, Any]] | None = None


class JobsPublic(BaseModel):
    data: list[JobPublic]
    count: int
    next_cursor: str | None


class ArtifactPublic(BaseModel):
    name: str = Field(description="File name within its step folder.")
    key: str = Field(description="Object key.")
    kind: Literal["model", "file", "report"]
    index: int | None = Field(description="Step index that wrote it (None: the job report).")
    step: str | None
    size: int | None
    url: str = Field(description="Presigned GET URL (file:// in embedded mode).")


class ArtifactsPublic(BaseModel):
    data: list[ArtifactPublic]
    expires_in: int


class StepPublic(BaseModel):
    name: str
    summary: str
    accepts: list[str]
    gate: bool
    params_schema: dict[str, Any]


class StepsPublic(BaseModel):
    data: list[StepPublic]
    count: int


class ProfilesPublic(BaseModel):
    data: list[dict[str, Any]]
    count: int
