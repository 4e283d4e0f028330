"""Job and step records as typed models: what the job store and the step log hold.

The stores keep their on-disk and DynamoDB formats (a record is stored as its JSON); these
models are what the code around them reads, with the predicates every reader needs stated
once: whether a step's gate rejected the job, a job's profile name, where its report lives.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from modules.core.jobspec import DEFAULT_PROFILE, JobSpec, parse_job_spec

__all__ = ["DEFAULT_PROFILE", "TERMINAL", "JobRecord", "JobStatus", "StepRecord"]


class JobStatus(StrEnum):
    """Lifecycle of a job; values are the upper-case names."""

    QUEUED = "QUEUED"
    INPROGRESS = "INPROGRESS"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    REJECTED = "REJECTED"
    STOPPED = "STOPPED"


TERMINAL = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.REJECTED, JobStatus.STOPPED})


class StepRecord(BaseModel):
    """One step's record as run_step writes it (fields a step adds beyond these are kept)."""

    model_config = ConfigDict(frozen=True, extra="allow")

    job_id: str = Field(min_length=1)
    index: int = Field(ge=0, strict=True)  # a bool or "0" is no index
    step: str = Field(min_length=1)
    user_id: str | None = None
    profile: str | None = None
    n_steps: int | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    input_key: str | None = None
    input_size: int | None = None
    input_framework: str | None = None
    output_key: str | None = None
    output_size: int | None = None
    output_framework: str | None = None
    files: dict[str, str] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    verdict: dict[str, Any] | None = None
    duration_s: float | None = None

    @classmethod
    def of(cls, record: dict[str, Any] | StepRecord) -> StepRecord:
        """The typed view of a stored record (a record already typed is returned as is)."""
        return record if isinstance(record, StepRecord) else cls.model_validate(record)

    @property
    def rejected(self) -> bool:
        """Whether the step's gate verdict failed."""
        return self.verdict is not None and not self.verdict.get("passed", True)

    @property
    def rejection_reason(self) -> str | None:
        """The job's reason when the step's gate verdict failed, else None."""
        if not self.rejected:
            return None
        assert self.verdict is not None  # rejected implies a verdict
        return f"step {self.index} ({self.step}) rejected: {self.verdict.get('reason')}"

    @property
    def wrote_model(self) -> bool:
        """Whether the step stored a model of its own (not passed its input through)."""
        return bool(self.output_key) and self.output_key != self.input_key


class JobRecord(BaseModel):
    """A job as the job store holds it; the store is the truth for owner and status.

    `spec` is the stored spec as JSON, not a JobSpec: reading a job never validates its
    spec against the step registry (which loads the built-in steps, and refuses the spec
    of an old job whose step was since removed). `spec_model()` parses it when a step is
    to run; `profile_name` and `step_name` read the JSON.
    """

    model_config = ConfigDict(frozen=True, extra="allow")

    job_id: str
    user_id: str
    status: JobStatus = JobStatus.QUEUED
    spec: dict[str, Any]
    n_steps: int = Field(ge=1)
    step_index: int = 0
    reason: str | None = None
    attempts: int = 0
    model_id: str | None = None
    created_at: str | None = None
    updated_at: str | None = None
    owner: str | None = None  # the task that runs the job's steps (JobStore.begin_step)
    handed_off: int | None = None  # the step queued as a new task (engine.hand_off)
    _spec_model: JobSpec | None = PrivateAttr(default=None)

    @classmethod
    def new(cls, spec: JobSpec, **extra: Any) -> JobRecord:
        """The record of a freshly submitted spec (QUEUED at step 0)."""
        record = cls(
            job_id=spec.job_id,
            user_id=spec.user_id,
            spec=spec.model_dump(mode="json"),
            n_steps=len(spec.steps),
            **extra,
        )
        record._spec_model = spec  # already validated: spec_model() reuses it
        return record

    def to_store(self) -> dict[str, Any]:
        """The fields JobStore.create takes (the spec as JSON, no unset extras)."""
        fields = self.model_dump(mode="json")
        return {name: v for name, v in fields.items() if v is not None or name == "reason"}

    def spec_model(self) -> JobSpec:
        """The spec validated against the registry (parse_job_spec), parsed once per record;
        BadInputError when it no longer validates."""
        if self._spec_model is None:
            self._spec_model = parse_job_spec(self.spec)
        return self._spec_model

    @property
    def profile_name(self) -> str:
        return profile_name_of(self.spec)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def step_name(self, index: int) -> str:
        """The name of step `index` in the stored spec, or "?" when there is none."""
        steps = self.spec.get("steps", [])
        return str(steps[index]["name"]) if 0 <= index < len(steps) else "?"


def profile_name_of(spec: dict[str, Any]) -> str:
    """The profile name of a stored spec: a name, or an inline budget dumped with its name."""
    profile = spec.get("profile", DEFAULT_PROFILE)
    return profile if isinstance(profile, str) else str(profile.get("name", "custom"))
