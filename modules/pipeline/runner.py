"""The in-process pipeline runner: step after step through run_step, job status kept current."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from modules.core.jobspec import JobSpec
from modules.errors import McaasError
from modules.pipeline.run import run_step
from modules.storage.artifacts import ArtifactStore
from modules.storage.jobs import JobStatus, JobStore
from modules.storage.steplog import StepLog

ProgressFn = Callable[[int, int, dict[str, Any]], None]


@dataclass
class PipelineResult:
    job_id: str
    status: JobStatus
    reason: str | None
    records: list[dict[str, Any]] = field(default_factory=list)
    # The bad-input error that failed the job, so a CLI can exit 2 rather than 1.
    error: McaasError | None = None


def new_job_record(spec: JobSpec) -> dict[str, Any]:
    """The job store's record for a freshly submitted spec."""
    return {
        "job_id": spec.job_id,
        "user_id": spec.user_id,
        "status": JobStatus.QUEUED.value,
        "spec": spec.model_dump(mode="json"),
        "n_steps": len(spec.steps),
    }


def rejection_reason(record: dict[str, Any]) -> str | None:
    """The reason when a step's gate verdict failed, else None."""
    verdict = record.get("verdict")
    if verdict is not None and not verdict.get("passed", True):
        return f"step {record['index']} ({record['step']}) rejected: {verdict.get('reason')}"
    return None


def run_pipeline(
    spec: JobSpec,
    *,
    store: ArtifactStore,
    log: StepLog,
    jobs: JobStore | None = None,
    trust_pickle: bool = False,
    progress: ProgressFn | None = None,
) -> PipelineResult:
    """Run every step of `spec` in order; stop at a failed gate (REJECTED) or an error (FAILED)."""
    if jobs is not None and jobs.get(spec.job_id) is None:
        jobs.create(new_job_record(spec))
    records: list[dict[str, Any]] = []
    for index in range(len(spec.steps)):
        if jobs is not None:
            current = jobs.get(spec.job_id)
            if current is not None and current["status"] == JobStatus.STOPPED.value:
                return PipelineResult(
                    spec.job_id, JobStatus.STOPPED, current.get("reason"), records
                )
            jobs.update(spec.job_id, status=JobStatus.INPROGRESS.value, step_index=index)
        try:
            record = run_step(spec, index, store=store, log=log, trust_pickle=trust_pickle)
        except McaasError as exc:
            reason = f"step {index} ({spec.steps[index].name}) failed: {exc}"
            result = _finish(spec, jobs, JobStatus.FAILED, reason, records)
            result.error = exc
            return result
        except Exception as exc:  # a bug, not bad input: the job must not stay INPROGRESS
            reason = f"step {index} ({spec.steps[index].name}) crashed: {type(exc).__name__}: {exc}"
            _finish(spec, jobs, JobStatus.FAILED, reason, records)
            raise
        records.append(record)
        if progress is not None:
            progress(index + 1, len(spec.steps), record)
        rejected = rejection_reason(record)
        if rejected is not None:
            return _finish(spec, jobs, JobStatus.REJECTED, rejected, records)
    return _finish(spec, jobs, JobStatus.COMPLETED, None, records)


def _finish(
    spec: JobSpec,
    jobs: JobStore | None,
    status: JobStatus,
    reason: str | None,
    records: list[dict[str, Any]],
) -> PipelineResult:
    if jobs is not None:
        jobs.update(spec.job_id, status=status.value, reason=reason)
    return PipelineResult(spec.job_id, status, reason, records)
