"""The in-process runner: a stored job advanced step after step by the engine, in this process.

`mcaas run` and `mcaas demo` use it. It is the engine's loop (modules/pipeline/engine.py)
and nothing more: the same begin, run_step, status decision and report as the worker's.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from modules.core.jobspec import JobSpec
from modules.core.records import JobRecord, JobStatus, StepRecord
from modules.errors import McaasError
from modules.pipeline.engine import advance_to_end, report_key
from modules.pipeline.settings import Services
from modules.storage.artifacts import ArtifactStore
from modules.storage.jobs import JobStore, SqliteJobStore
from modules.storage.steplog import StepLog

ProgressFn = Callable[[int, int, StepRecord], None]


@dataclass
class PipelineResult:
    job_id: str
    status: JobStatus
    reason: str | None
    records: list[StepRecord] = field(default_factory=list)
    # The bad-input error that failed the job, so a CLI can exit 2 rather than 1.
    error: McaasError | None = None
    # The store key of the job's report.json (None when the job ended without one: stopped).
    report_key: str | None = None


def _store_job(jobs: JobStore, spec: JobSpec) -> None:
    """Create the job; a rerun of an existing id that did not complete (or changed) starts over."""
    if jobs.create(JobRecord.new(spec)):
        return
    current = jobs.get(spec.job_id)
    dumped = spec.model_dump(mode="json")
    if current is not None and (current.status != JobStatus.COMPLETED or current.spec != dumped):
        # Its stored step records stay: run_step returns those that already ran.
        jobs.update(
            spec.job_id,
            status=JobStatus.QUEUED.value,
            spec=dumped,
            n_steps=len(spec.steps),
            step_index=0,
            reason=None,
        )


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
    if jobs is None:
        with tempfile.TemporaryDirectory(prefix="mcaas-jobs-") as tmp:
            return run_pipeline(
                spec,
                store=store,
                log=log,
                jobs=SqliteJobStore(Path(tmp) / "jobs.sqlite"),
                trust_pickle=trust_pickle,
                progress=progress,
            )
    services = Services(store, log, jobs)
    _store_job(jobs, spec)

    def after_step(index: int) -> None:
        record = log.get(spec.job_id, index) if progress is not None else None
        if progress is not None and record is not None:
            progress(index + 1, len(spec.steps), record)

    error = advance_to_end(
        spec.job_id, 0, services, trust_pickle=trust_pickle, after_step=after_step
    )
    job = jobs.get(spec.job_id)
    assert job is not None  # created above; the job store does not lose records
    key = report_key(job)
    return PipelineResult(
        spec.job_id,
        job.status,
        job.reason,
        log.records(spec.job_id),
        error=error,
        report_key=key if store.exists(key) else None,
    )
