"""Advance a stored job by one step: the body shared by the Celery task, ECS job mode and inline.

The job store is the truth. Each call re-reads the job by id, runs one step through
`modules.pipeline.run.run_step` (which writes each record once), then records the outcome
on the job. `hand_off` queues the next step and notes it on the job, so a redelivered
task for a step whose successor is already queued does nothing; one that died before
queueing it queues it again (a duplicate successor is harmless: run_step is idempotent,
and with an owner, JobStore.begin_step lets only one of the two run the step).

A Celery task may run several steps of its job in a row (workers/tasks.py); it passes
its message id as `owner`, so its message, delivered again after its worker died,
resumes the job where it stopped.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, NamedTuple

from modules.core.step import StepCancelled
from modules.errors import McaasError
from modules.pipeline.settings import Services, Settings
from modules.pipeline.step_cache import StepCache
from modules.storage.jobs import OWNER_FIELD, TERMINAL, JobStatus, JobStore

logger = logging.getLogger(__name__)

# Error codes AWS answers when it is busy or briefly unavailable; everything else is real.
_TRANSIENT_AWS_CODES = frozenset(
    {
        "ThrottlingException",
        "Throttling",
        "ProvisionedThroughputExceededException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "InternalServerError",
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "RequestTimeout",
        "RequestTimeoutException",
        "500",
        "502",
        "503",
        "504",
    }
)


class TransientInfraError(Exception):
    """An S3, DynamoDB or Redis hiccup that is worth retrying; wraps the original error."""


def is_transient(exc: BaseException) -> bool:
    """True for connection failures, timeouts and throttling of S3, DynamoDB or Redis."""
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        ReadTimeoutError,
    )
    from botocore.exceptions import (
        ConnectionError as BotoConnectionError,
    )
    from kombu.exceptions import OperationalError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    transient = (
        BotoConnectionError,
        ConnectionClosedError,
        ReadTimeoutError,
        OperationalError,
        RedisConnectionError,
        RedisTimeoutError,
    )
    if isinstance(exc, transient):
        return True
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        return str(error.get("Code", "")) in _TRANSIENT_AWS_CODES
    return False


def _step_name(job: dict[str, Any], index: int) -> str:
    steps = job.get("spec", {}).get("steps", [])
    return str(steps[index]["name"]) if 0 <= index < len(steps) else "?"


def finish_job(
    services: Services,
    job_id: str,
    status: JobStatus,
    reason: str | None,
    *,
    job: dict[str, Any] | None = None,
    records: list[dict[str, Any]] | None = None,
) -> dict[str, Any] | None:
    """Set a terminal status unless the user stopped the job meanwhile; write report.json.

    `job` is the record the caller already holds (its spec is all the report needs from it);
    without one it is read first. `records` are the job's step records when the caller has
    them all; without them the step log is queried.
    """
    current = job if job is not None else services.jobs.get(job_id)
    if current is None:
        return None
    if current["status"] == JobStatus.STOPPED:
        return current
    # The report goes first: whoever sees the terminal status can fetch the report. When the
    # store refuses it (e.g. the bucket is gone), the status must still be recorded, or the
    # job would stay INPROGRESS with its reason lost.
    _write_report_quietly(
        services, {**current, "status": status.value, "reason": reason}, records=records
    )
    finished = services.jobs.update_unless(
        job_id, {JobStatus.STOPPED}, status=status.value, reason=reason
    )
    if finished is not None:
        return finished
    # The user stopped the job while its report was being written: the report says so too.
    stopped = services.jobs.get(job_id)
    if stopped is not None:
        _write_report_quietly(services, stopped)
    return stopped


def _write_report_quietly(
    services: Services, job: dict[str, Any], *, records: list[dict[str, Any]] | None = None
) -> None:
    try:
        write_job_report(services, job, records=records)
    except Exception:
        logger.exception(
            "job %s: could not write report.json; recording %s anyway", job["job_id"], job["status"]
        )


def report_key(job: dict[str, Any]) -> str:
    """Where the job's report.json lives: beside its step folders (see run.step_prefix)."""
    profile = job["spec"].get("profile", "edge-8mb")
    # A stored spec holds a profile name, or an inline budget dumped with its name.
    name = profile if isinstance(profile, str) else profile.get("name", "custom")
    return f"users/{job['user_id']}/{name}/{job['job_id']}/report.json"


def write_job_report(
    services: Services, job: dict[str, Any], *, records: list[dict[str, Any]] | None = None
) -> str | None:
    """Store the job report built from its step records (read when not given)."""
    from modules.pipeline.report import job_report

    if records is None:
        records = services.log.records(job["job_id"])
    report = job_report(
        spec=job["spec"], status=job["status"], reason=job.get("reason"), records=records
    )
    key = report_key(job)
    services.store.put_bytes(key, json.dumps(report, indent=2, default=str).encode("utf-8"))
    return key


def execute_step(
    job_id: str,
    index: int,
    *,
    services: Services,
    trust_pickle: bool = False,
    cache: StepCache | None = None,
    owner: str | None = None,
) -> int | None:
    """Run step `index` of the stored job and record the outcome; return the next index or None.

    `owner` is the id of the broker message that runs the job's steps from `index` on (see
    JobStore.begin_step): a duplicate message of a step another owner began is dropped, and
    the owner's own message, delivered again after its worker died, resumes at the step the
    job was on (which may be past `index` when the task ran several steps).

    Our errors (bad params, wrong framework, unsafe model) fail the job with their message;
    a transient infrastructure error is raised as TransientInfraError for a retry; any
    other exception fails the job with its type and message, then propagates.
    """
    return _advance(
        job_id, index, services=services, trust_pickle=trust_pickle, cache=cache, owner=owner
    ).next_index


def execute_steps(
    job_id: str,
    index: int,
    *,
    services: Services,
    owner: str,
    continue_s: float,
    trust_pickle: bool = False,
    cache: StepCache | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> int | None:
    """Run step `index`, then the job's next steps in a row while less than `continue_s`
    has passed; return the step to queue as a new task, or None when the job is done.

    A step run in a row is begun (JobStore.begin_step) in a second thread while its body
    runs, and its outputs are stored only once that write has succeeded: a refusal (the job
    was stopped meanwhile) discards them, and a long body stops at its next
    `check_cancelled()` (the training loop's next epoch). Each begin still follows the
    previous step's record, so a redelivered message resumes exactly as for one step per
    task.
    """
    deadline = clock() + continue_s
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mcaas-begin") as beside:
        job: dict[str, Any] | None = None
        begun: Future[dict[str, Any] | None] | None = None
        while True:
            step = _advance(
                job_id,
                index,
                services=services,
                trust_pickle=trust_pickle,
                cache=cache,
                owner=owner,
                job=job,
                begun=begun,
            )
            if step.next_index is None or clock() >= deadline:
                return step.next_index
            index, job = step.next_index, step.job
            begun = beside.submit(services.jobs.begin_step, job_id, index, owner=owner)


class _Step(NamedTuple):
    next_index: int | None  # the step to run next; None when the job is done or not ours
    job: dict[str, Any] | None  # the job record as this step began


_DONE = _Step(None, None)


class _NotBegun(Exception):
    """The job store refused to begin a step that was run in a row: do not store it."""


def _begin(
    services: Services, job_id: str, index: int, owner: str | None
) -> tuple[dict[str, Any], int] | None:
    """Begin step `index` (or, for the owner's message delivered again, the step where its
    chain stopped); return the job record and the step, or None when there is nothing to run."""
    jobs = services.jobs
    # One atomic write reads the job, marks the step running and counts the attempt.
    job = jobs.begin_step(job_id, index, owner=owner)
    if job is not None:
        return job, index
    # Refused: the job is gone, has ended, a later step has begun, or another owner began
    # this one.
    current = jobs.get(job_id)
    if current is None:
        logger.warning("job %s not found; dropping its step %d", job_id, index)
        return None
    if current["status"] in TERMINAL:
        logger.info("job %s step %d: job ended; dropped", job_id, index)
        return None
    if owner is not None and _resumes(current, index, owner):
        step = int(current["step_index"])
        logger.info("job %s: owner %s resumes at step %d", job_id, owner, step)
        job = jobs.begin_step(job_id, step, owner=owner)
        return None if job is None else (job, step)  # None: it ended meanwhile
    if owner is not None or services.log.get(job_id, index) is not None:
        logger.info("job %s step %d: another task has it or it is done", job_id, index)
        return None
    return current, index


def _advance(
    job_id: str,
    index: int,
    *,
    services: Services,
    trust_pickle: bool,
    cache: StepCache | None,
    owner: str | None,
    job: dict[str, Any] | None = None,
    begun: Future[dict[str, Any] | None] | None = None,
) -> _Step:
    """execute_step's body. With `begun` (step `index` being begun in another thread, and
    `job` the record as the previous step began), the body runs meanwhile and its outputs
    are stored only once the begin has succeeded."""
    from modules.core.jobspec import parse_job_spec
    from modules.pipeline.run import run_step
    from modules.pipeline.runner import rejection_reason

    name = "?"
    try:
        if begun is None or job is None:
            started = _begin(services, job_id, index, owner)
            if started is None:
                return _DONE
            job, index = started
            if job.get("handed_off", 0) > index and services.log.get(job_id, index) is not None:
                logger.info("job %s step %d: ran and was handed off; dropped", job_id, index)
                return _DONE
        name = _step_name(job, index)
        confirmed: list[dict[str, Any]] = []

        def confirm() -> None:
            assert begun is not None
            current = begun.result()
            if current is None:
                raise _NotBegun
            confirmed.append(current)

        def refused() -> bool:
            # Asked by the body between rounds (check_cancelled): the begin was refused.
            assert begun is not None
            return begun.done() and begun.exception() is None and begun.result() is None

        try:
            spec = parse_job_spec(job["spec"])
            record = run_step(
                spec,
                index,
                store=services.store,
                log=services.log,
                trust_pickle=trust_pickle,
                cache=cache,
                before_save=confirm if begun is not None else None,
                cancelled=refused if begun is not None else None,
            )
            if begun is not None and not confirmed:
                confirm()  # the step had already run: its begin still has to hold
        except (_NotBegun, StepCancelled):
            # Nothing of this step is stored: its begin was refused (the job was stopped).
            logger.info("job %s step %d: not begun (stopped meanwhile); dropped", job_id, index)
            return _DONE
        except McaasError as exc:
            reason = f"step {index} ({name}) failed: {exc}"
            finish_job(services, job_id, JobStatus.FAILED, reason, job=job)
            return _DONE
        if confirmed:
            job = confirmed[0]
        rejected = rejection_reason(record)
        last = index + 1 >= len(spec.steps)
        if rejected is not None or last:
            known = cache.known_records(job_id, index + 1) if cache is not None else None
            records = [known[i] for i in sorted(known)] if known is not None else None
            if rejected is not None:
                finish_job(services, job_id, JobStatus.REJECTED, rejected, job=job, records=records)
            else:
                finish_job(services, job_id, JobStatus.COMPLETED, None, job=job, records=records)
            return _DONE
        # A stop that came during this step is seen when the next one begins.
        return _Step(index + 1, job)
    except Exception as exc:
        if is_transient(exc):
            raise TransientInfraError(f"{type(exc).__name__}: {exc}") from exc
        reason = f"step {index} ({name}) crashed: {type(exc).__name__}: {exc}"
        _fail_quietly(services, job_id, reason)
        raise


def _resumes(current: dict[str, Any], index: int, owner: str) -> bool:
    """Whether `owner`'s message for step `index` is its own chain delivered again: the job
    still names it as owner, is on a later step, and was not handed on to another message."""
    return (
        current.get(OWNER_FIELD) == owner
        and int(current["step_index"]) > index
        and int(current.get("handed_off", 0)) <= index
    )


def _fail_quietly(services: Services, job_id: str, reason: str) -> None:
    # Best effort: the store may be what failed; the original error is what matters.
    try:
        finish_job(services, job_id, JobStatus.FAILED, reason)
    except Exception:
        logger.exception("could not mark job %s FAILED", job_id)


def fail_job(services: Services, job_id: str, reason: str) -> None:
    """Mark a job FAILED (unless already terminal); used when retries run out."""
    current = services.jobs.get(job_id)
    if current is not None and current["status"] not in TERMINAL:
        _fail_quietly(services, job_id, reason)


def stale_after_s(settings: Settings) -> float:
    """How long a queued or running job may go without an update before it counts as lost.

    A running step updates the job when it starts and ends within the hard time limit; a
    step whose worker died is redelivered after the visibility timeout plus one restore
    sweep. Past both (with a second sweep as margin) no task is coming for the job.
    """
    from workers.celery_app import restore_interval_s

    longest = max(settings.visibility_timeout_s, settings.task_time_limit_s)
    return float(longest + 2 * restore_interval_s(settings))


def fail_if_stale(
    services: Services, job: dict[str, Any], *, stale_after: float, now: datetime | None = None
) -> dict[str, Any]:
    """Mark a QUEUED/INPROGRESS job with no update for `stale_after` s FAILED, with the reason.

    The watchdog for lost broker messages (e.g. Redis restarted without persistence): it
    runs when the job is read, so every poll of a silent job ends in a clear FAILED.
    """
    if job["status"] not in (JobStatus.QUEUED, JobStatus.INPROGRESS):
        return job
    idle = ((now or datetime.now(UTC)) - datetime.fromisoformat(job["updated_at"])).total_seconds()
    if idle <= stale_after:
        return job
    reason = (
        f"no progress for {idle:.0f} s (limit {stale_after:.0f} s) while {job['status']} at "
        f"step {int(job.get('step_index', 0))}: its task was lost (worker or broker failure)"
    )
    logger.warning("job %s: %s", job["job_id"], reason)
    return finish_job(services, job["job_id"], JobStatus.FAILED, reason) or job


def hand_off(
    job_id: str, next_index: int, *, jobs: JobStore, enqueue: Callable[[str, int], None]
) -> None:
    """Queue step `next_index`, then note on the job that it is queued (see module doc).

    Only the task of step next_index - 1 writes this value, after its own record, so the
    field only grows: a redelivered older step is dropped before it gets here.
    """
    enqueue(job_id, next_index)
    jobs.update(job_id, handed_off=next_index)
