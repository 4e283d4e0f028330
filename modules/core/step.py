"""What a step function receives and returns."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modules.core.artifact import ModelArtifact
from modules.core.profiles import Profile


class StepCancelled(Exception):
    """The runner no longer wants this step's result (its job was stopped): stop early."""


_CANCELLED: ContextVar[Callable[[], bool] | None] = ContextVar("mcaas_step_cancelled", default=None)


@contextlib.contextmanager
def cancellable(cancelled: Callable[[], bool] | None) -> Iterator[None]:
    """Make `check_cancelled` ask `cancelled` while a step body runs in this context."""
    token = _CANCELLED.set(cancelled)
    try:
        yield
    finally:
        _CANCELLED.reset(token)


def check_cancelled() -> None:
    """Raise StepCancelled if the runner has said it no longer wants this step's result.

    Long loops call it between rounds (the shared training loop does, once per epoch); it
    costs nothing when the step runs without a cancel check (CLI, in-process runs).
    """
    cancelled = _CANCELLED.get()
    if cancelled is not None and cancelled():
        raise StepCancelled("the step's result is no longer wanted (its job was stopped)")


ProgressReporter = Callable[[dict[str, Any]], None]
_PROGRESS: ContextVar[ProgressReporter | None] = ContextVar("mcaas_step_progress", default=None)


@contextlib.contextmanager
def reporting_progress(report: ProgressReporter | None) -> Iterator[None]:
    """Hand what `report_progress` is told to `report` too, while a step body runs here.

    Reporters nest: the job engine's (which writes the job record) and an outer one, like
    the local CLI's progress bar, both hear every report.
    """
    if report is None:
        yield
        return
    outer = _PROGRESS.get()

    def both(info: dict[str, Any]) -> None:
        report(info)
        if outer is not None:
            outer(info)

    token = _PROGRESS.set(both)
    try:
        yield
    finally:
        _PROGRESS.reset(token)


def report_progress(info: dict[str, Any]) -> None:
    """Tell whoever runs this step how far it has got (a search's trials, say).

    `info` is a small JSON-able dict; its `text` is what progress displays show. It costs
    nothing when no one listens.
    """
    report = _PROGRESS.get()
    if report is not None:
        report(info)


@dataclass(frozen=True)
class Verdict:
    """A gate's decision. `reason` always states the numbers behind it."""

    passed: bool
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "reason": self.reason}


@dataclass
class StepOutput:
    """What a step hands back.

    model: the transformed model, or None when the step only looks at its input
        (measure, gates, report): the input artifact then passes through unchanged.
    metrics: JSON-able numbers; repeated measurements as `modules.evaluation.stats` dicts.
    files: extra files to store beside the model, name -> bytes (reports, plots, CSVs).
    verdict: set by gate steps; a failed verdict stops the job with status REJECTED.
    """

    model: ModelArtifact | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    verdict: Verdict | None = None


@dataclass
class StepContext:
    """Everything about the job a step may need, without knowing where it runs.

    history: the step records of the earlier steps of this job, in order.
    load_model: loads a stored model artifact by key (for steps that compare against
        an earlier model, like the ONNX parity gate or distillation's teacher).
    workdir: a private scratch directory, removed after the step.
    """

    job_id: str
    user_id: str
    profile: Profile
    seed: int
    repeats: int
    step_index: int
    step_name: str
    workdir: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    load_model: Callable[[str], ModelArtifact] | None = None
    # Raw bytes of a stored object (a user's inputs file); steps build the key from user_id.
    read_bytes: Callable[[str], bytes] | None = None
