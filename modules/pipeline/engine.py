"""The job engine: advance a stored job by one step, decide its status, write its one report.

Every face runs jobs through here: the Celery task, the ECS job mode, the inline dispatcher
and the in-process runner (`mcaas run`, `mcaas demo`). The job store is the truth. Each
call re-reads the job by id, begins the step (JobStore.begin_step), runs it through
`modules.pipeline.run.run_step` (which writes each record once), then records the outcome
on the job: the next step, or COMPLETED, REJECTED (a failed gate) or FAILED, with the
report written to `report.json` beside the job's step folders before the status is.

`hand_off` queues the next step and notes it on the job, so a redelivered task for a step
whose successor is already queued does nothing; one that died before queueing it queues it
again (a duplicate successor is harmless: run_step is idempotent, and with an owner,
JobStore.begin_step lets only one of the two run the step).

A task may run several steps of its job in a row (`advance_in_a_row`); it passes its
message id as `owner`, so its message, delivered again after its worker died, resumes the
job where it stopped.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from typing import NamedTuple, Protocol, runtime_checkable

from modules.core.records import JobRecord, JobStatus, StepRecord
from modules.core.step import ProgressReporter, StepCancelled
from modules.errors import McaasError
from modules.pipeline.settings import Services
from modules.pipeline.step_cache import StepCache, caching_services
from modules.storage import keys
from modules.storage.jobs import JobStore

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


@runtime_checkable
class Dispatcher(Protocol):
    """Starts a job's first step and queues each later one (workers/dispatch.py has the
    Celery, ECS and inline ones); each run of a step ends in `advance`."""

    def submit(self, job_id: str) -> None:
        """Start the stored job at step 0."""
        ...

    def enqueue(self, job_id: str, index: int) -> None:
        """Queue step `index` of the stored job."""
        ...


class TransientInfraError(Exception):
    """An S3, DynamoDB or Redis hiccup that is worth retrying; wraps the original error."""


def is_transient(exc: BaseException) -> bool:
    """True for connection failures, timeouts and throttling of S3, DynamoDB or Redis."""
    transient: list[type[BaseException]] = []
    try:
        from botocore.exceptions import ClientError, ConnectionClosedError, ReadTimeoutError
        from botocore.exceptions import ConnectionError as BotoConnectionError
    except ImportError:  # no boto3 here: no S3 or DynamoDB to fail either
        pass
    else:
        if isinstance(exc, ClientError):
            return str(exc.response.get("Error", {}).get("Code", "")) in _TRANSIENT_AWS_CODES
        transient += [BotoConnectionError, ConnectionClosedError, ReadTimeoutError]
    try:
        from kombu.exceptions import OperationalError
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError
    except ImportError:  # no broker client here (embedded mode)
        pass
    else:
        transient += [OperationalError, RedisConnectionError, RedisTimeoutError]
    return isinstance(exc, tuple(transient))


def report_key(job: JobRecord) -> str:
    """Where the job's one report.json lives: beside its step folders (see run.step_prefix)."""
    return keys.job_report_key(user_id=job.user_id, profile=job.profile_name, job_id=job.job_id)


def write_report(
    services: Services, job: JobRecord, *, records: list[StepRecord] | None = None
) -> str:
    """Store the job report built from its step records (read when not given); return its key."""
    from modules.evaluation.summary import job_report

    if records is None:
        records = services.log.records(job.job_id)
    report = job_report(spec=job.spec, status=job.status, reason=job.reason, records=records)
    key = report_key(job)
    services.store.put_bytes(key, json.dumps(report, indent=2, default=str).encode("utf-8"))
    return key


def _write_report_quietly(
    services: Services, job: JobRecord, *, records: list[StepRecord] | None = None
) -> None:
    try:
        write_report(services, job, records=records)
    except Exception:
        logger.exception(
            "job %s: could not write report.json; recording %s anyway", job.job_id, job.status
        )


# A long step's progress reaches its job record at most this often: each is one store write.
PROGRESS_INTERVAL_S = 1.0


def progress_writer(jobs: JobStore, job_id: str, index: int, step: str) -> ProgressReporter:
    """Write what a step reports (report_progress) to its job record as `step_progress`."""
    last = float("-inf")

    def write(info: dict[str, object]) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last < PROGRESS_INTERVAL_S:
            return
        last = now
        try:
            jobs.update(job_id, step_progress={**info, "index": index, "step": step})
        except Exception as exc:  # progress is advisory: a failed write never fails the step
            logger.warning("job %s step %d: progress not recorded: %s", job_id, index, exc)

    return write


def finish(
    services: Services,
    job_id: str,
    status: JobStatus,
    reason: str | None,
    *,
    job: JobRecord | None = None,
    records: list[StepRecord] | None = None,
) -> JobRecord | None:
    """Set a terminal status unless the user stopped the job meanwhile; write report.json.

    `job` is the record the caller already holds (its spec is all the report needs from it);
    without one it is read first. `records` are the job's step records when the caller has
    them all; without them the step log is queried.
    """
    current = job if job is not None else services.jobs.get(job_id)
    if current is None:
        return None
    if current.status == JobStatus.STOPPED:
        return current
    # The report goes first: whoever sees the terminal status can fetch the report. When the
    # store refuses it (e.g. the bucket is gone), the status must still be recorded, or the
    # job would stay INPROGRESS with its reason lost.
    _write_report_quietly(
        services, current.model_copy(update={"status": status, "reason": reason}), records=records
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


def stop(services: Services, job_id: str, reason: str = "stopped by the user") -> JobRecord:
    """Mark the job STOPPED and write its report: the running step finishes (its record
    is kept), no later step starts."""
    stopped = services.jobs.update(job_id, status=JobStatus.STOPPED.value, reason=reason)
    _write_report_quietly(services, stopped)
    return stopped


def _report_stopped(services: Services, job: JobRecord) -> None:
    """Rewrite a stopped job's report once the step that ran on after the stop has its record
    (the report written at the stop could not hold it)."""
    if job.status == JobStatus.STOPPED:
        _write_report_quietly(services, job)


def _fail_quietly(services: Services, job_id: str, reason: str) -> None:
    # Best effort: the store may be what failed; the original error is what matters.
    try:
        finish(services, job_id, JobStatus.FAILED, reason)
    except Exception:
        logger.exception("could not mark job %s FAILED", job_id)


def fail_job(services: Services, job_id: str, reason: str) -> None:
    """Mark a job FAILED (unless already terminal); used when retries run out."""
    current = services.jobs.get(job_id)
    if current is not None and not current.terminal:
        _fail_quietly(services, job_id, reason)


def fail_if_stale(
    services: Services, job: JobRecord, *, stale_after: float, now: datetime | None = None
) -> JobRecord:
    """Mark a QUEUED/INPROGRESS job with no update for `stale_after` s FAILED, with the reason.

    The watchdog for lost broker messages (e.g. Redis restarted without persistence): it
    runs when the job is read, so every poll of a silent job ends in a clear FAILED. The
    limit comes from modules.pipeline.settings.stale_after_s.
    """
    if job.status not in (JobStatus.QUEUED, JobStatus.INPROGRESS) or job.updated_at is None:
        return job
    idle = ((now or datetime.now(UTC)) - datetime.fromisoformat(job.updated_at)).total_seconds()
    if idle <= stale_after:
        return job
    reason = (
        f"no progress for {idle:.0f} s (limit {stale_after:.0f} s) while {job.status} at "
        f"step {job.step_index}: its task was lost (worker or broker failure)"
    )
    logger.warning("job %s: %s", job.job_id, reason)
    return finish(services, job.job_id, JobStatus.FAILED, reason) or job


def hand_off(
    job_id: str, next_index: int, *, jobs: JobStore, enqueue: Callable[[str, int], None]
) -> None:
    """Queue step `next_index`, then note on the job that it is queued (see module doc).

    Only the task of step next_index - 1 writes this value, after its own record, so the
    field only grows: a redelivered older step is dropped before it gets here.
    """
    enqueue(job_id, next_index)
    jobs.update(job_id, handed_off=next_index)


class Advanced(NamedTuple):
    """What one advance did."""

    next_index: int | None  # the step to run next; None when the job is done or not ours
    job: JobRecord | None = None  # the job record as this step began
    error: McaasError | None = None  # the bad-input error that failed the job, if one did


_DONE = Advanced(None)


class _NotBegun(Exception):
    """The job store refused to begin a step that was run in a row: do not store it."""


def _begin(
    services: Services, job_id: str, index: int, owner: str | None
) -> tuple[JobRecord, int] | None:
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
    if current.terminal:
        logger.info("job %s step %d: job ended; dropped", job_id, index)
        _report_stopped(services, current)
        return None
    if owner is not None and _resumes(current, index, owner):
        step = current.step_index
        logger.info("job %s: owner %s resumes at step %d", job_id, owner, step)
        job = jobs.begin_step(job_id, step, owner=owner)
        return None if job is None else (job, step)  # None: it ended meanwhile
    if owner is not None or services.log.get(job_id, index) is not None:
        logger.info("job %s step %d: another task has it or it is done", job_id, index)
        return None
    return current, index


def _resumes(current: JobRecord, index: int, owner: str) -> bool:
    """Whether `owner`'s message for step `index` is its own chain delivered again: the job
    still names it as owner, is on a later step, and was not handed on to another message."""
    return (
        current.owner == owner and current.step_index > index and (current.handed_off or 0) <= index
    )


class _BegunBeside:
    """run_step's guard for a step whose begin runs in another thread while its body does."""

    def __init__(self, begun: Future[JobRecord | None]) -> None:
        self.begun = begun
        self.confirmed: JobRecord | None = None

    def confirm(self) -> None:
        current = self.begun.result()
        if current is None:
            raise _NotBegun
        self.confirmed = current

    def cancelled(self) -> bool:
        # Asked by the body between rounds (check_cancelled): the begin was refused.
        b = self.begun
        return b.done() and b.exception() is None and b.result() is None


def advance(
    job_id: str,
    index: int,
    services: Services,
    *,
    trust_pickle: bool = False,
    cache: StepCache | None = None,
    owner: str | None = None,
    job: JobRecord | None = None,
    begun: Future[JobRecord | None] | None = None,
) -> Advanced:
    """Run step `index` of the stored job and record the outcome on the job.

    `owner` is the id of the broker message that runs the job's steps from `index` on (see
    JobStore.begin_step): a duplicate message of a step another owner began is dropped, and
    the owner's own message, delivered again after its worker died, resumes at the step the
    job was on (which may be past `index` when the task ran several steps). `cache` (a
    long-lived worker's) saves step-log queries and downloads. With `begun` (step `index`
    being begun in another thread, and `job` the record as the previous step began), the
    body runs meanwhile and its outputs are stored only once the begin has succeeded.

    Our errors (bad params, wrong framework, unsafe model) fail the job with their message;
    a transient infrastructure error is raised as TransientInfraError for a retry; any
    other exception fails the job with its type and message, then propagates.
    """
    from modules.pipeline.run import run_step

    name = "?"
    used = caching_services(services, cache, upto=index) if cache is not None else services
    try:
        if begun is None or job is None:
            started = _begin(services, job_id, index, owner)
            if started is None:
                return _DONE
            job, index = started
            if (job.handed_off or 0) > index and services.log.get(job_id, index) is not None:
                logger.info("job %s step %d: ran and was handed off; dropped", job_id, index)
                return _DONE
            if cache is not None:
                used = caching_services(services, cache, upto=index)
        name = job.step_name(index)
        guard = _BegunBeside(begun) if begun is not None else None
        try:
            spec = job.spec_model()
            record = run_step(
                spec,
                index,
                store=used.store,
                log=used.log,
                trust_pickle=trust_pickle,
                guard=guard,
                progress=progress_writer(services.jobs, job_id, index, name),
            )
            if guard is not None and guard.confirmed is None:
                guard.confirm()  # the step had already run: its begin still has to hold
        except (_NotBegun, StepCancelled):
            # Nothing of this step is stored: its begin was refused (the job was stopped).
            logger.info("job %s step %d: not begun (stopped meanwhile); dropped", job_id, index)
            current = services.jobs.get(job_id)
            if current is not None:
                _report_stopped(services, current)
            return _DONE
        except McaasError as exc:
            reason = f"step {index} ({name}) failed: {exc}"
            finish(services, job_id, JobStatus.FAILED, reason, job=job)
            return Advanced(None, job, exc)
        if guard is not None and guard.confirmed is not None:
            job = guard.confirmed
        rejected = record.rejection_reason
        if rejected is not None or index + 1 >= len(spec.steps):
            known = cache.known_records(job_id, index + 1) if cache is not None else None
            records = [known[i] for i in sorted(known)] if known is not None else None
            status = JobStatus.REJECTED if rejected is not None else JobStatus.COMPLETED
            finish(services, job_id, status, rejected, job=job, records=records)
            return _DONE
        # A stop that came during this step is seen when the next one begins.
        return Advanced(index + 1, job)
    except Exception as exc:
        if is_transient(exc):
            raise TransientInfraError(f"{type(exc).__name__}: {exc}") from exc
        reason = f"step {index} ({name}) crashed: {type(exc).__name__}: {exc}"
        _fail_quietly(services, job_id, reason)
        raise


def advance_in_a_row(
    job_id: str,
    index: int,
    services: Services,
    *,
    owner: str,
    continue_s: float,
    trust_pickle: bool = False,
    cache: StepCache | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> int | None:
    """Advance step `index`, then the job's next steps in a row while less than `continue_s`
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
        job: JobRecord | None = None
        begun: Future[JobRecord | None] | None = None
        while True:
            step = advance(
                job_id,
                index,
                services,
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


def advance_to_end(
    job_id: str,
    index: int,
    services: Services,
    *,
    trust_pickle: bool = False,
    after_step: Callable[[int], None] | None = None,
) -> McaasError | None:
    """Advance the job from step `index` until it ends (or is not ours to run); return the
    bad-input error that failed it, if one did. `after_step(i)` follows each advance of i."""
    next_index: int | None = index
    while next_index is not None:
        step = advance(job_id, next_index, services, trust_pickle=trust_pickle)
        if step.error is not None:
            return step.error
        if after_step is not None:
            after_step(next_index)
        next_index = step.next_index
    return None
