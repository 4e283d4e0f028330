"""The one Celery task: run step `index` of job `job_id`, then queue the next step.

A thin adapter over the job engine (`modules.pipeline.engine.advance_in_a_row`, which
calls the foundation's run_step). Never `.get()` here: a task waiting on another task
can deadlock the pool.

While the task has run for less than MCAAS_CONTINUE_INLINE_S, it runs the job's next
step itself instead of queueing it: the step is the same run_step with the same records,
only the broker round trip and the hand-off note are saved. Each step still begins with
JobStore.begin_step (sent while its body runs; its outputs are stored only once that write
holds, so a stop is still seen between steps), and the task's message id is the job's
owner there, so a redelivery resumes the job at the step its worker died in.
Past the budget the next step is queued as its own task, which gets the full time limits.

A MemoryError leaves the task as StepOutOfMemory: Celery's main process re-raises a task's
MemoryError as an unrecoverable error of its own and the whole worker exits, leaving every
other queued job waiting. The job is already FAILED with the reason by then (the engine
records it); the pool process serves the next task, or is replaced when its resident memory
stayed high (workers/celery_app.py).
"""

from __future__ import annotations

import logging
import random
from typing import Any

from celery import Task
from celery.exceptions import Reject, TimeLimitExceeded

from modules.pipeline.engine import (
    TransientInfraError,
    advance_in_a_row,
    fail_job,
    hand_off,
    is_transient,
)
from modules.pipeline.settings import get_settings
from workers.celery_app import celery_app
from workers.dispatch import CeleryDispatcher
from workers.names import TASK_NAME
from workers.services import worker_services, worker_step_cache

__all__ = [
    "StepOutOfMemory",
    "backoff_s",
    "broker_failed",
    "run_step_task",
    "worker_services",
    "worker_step_cache",
]

logger = logging.getLogger(__name__)

MAX_BACKOFF_S = 60.0


def broker_failed(exc: BaseException) -> bool:
    """True when the error came from the broker connection (Redis), not from S3 or DynamoDB."""
    from kombu.exceptions import OperationalError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    return isinstance(exc, OperationalError | RedisConnectionError | RedisTimeoutError)


def backoff_s(retries: int) -> float:
    """Exponential backoff with jitter: about 1, 2, 4, ... seconds, capped at a minute."""
    return min(MAX_BACKOFF_S, 2.0**retries) * (0.5 + random.random() / 2)


class StepOutOfMemory(RuntimeError):
    """A step ran out of memory in this pool process; its job is already FAILED."""


class StepTask(Task):
    """Records on the job any failure the task body could not record itself.

    Celery calls on_failure from the worker's main process when the hard time limit kills
    the pool child, where no task code runs any more.
    """

    def on_failure(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        job_id = args[0]
        # The step the job was on: the task may have run several after the one it was sent for.
        job = worker_services().jobs.get(job_id)
        index = job.step_index if job is not None else args[1]
        if isinstance(exc, TimeLimitExceeded):
            reason = f"step {index} exceeded the hard time limit and was killed"
        else:
            reason = f"step {index} failed: {type(exc).__name__}"
        fail_job(worker_services(), job_id, reason)


# max_retries=None: the cap is MCAAS_TASK_MAX_RETRIES, checked in the body.
@celery_app.task(bind=True, base=StepTask, name=TASK_NAME, acks_late=True, max_retries=None)
def run_step_task(self: Any, job_id: str, index: int) -> None:
    """Run step `index` through run_step, and the next ones while within
    MCAAS_CONTINUE_INLINE_S; then queue the next one unless the job ended."""
    try:
        _advance(self, job_id, index)
    except MemoryError as exc:
        detail = str(exc) or "an allocation was refused"
    else:
        return
    # Raised outside the except block: nothing the step held stays reachable through the
    # MemoryError's traceback once this task has ended.
    raise StepOutOfMemory(f"job {job_id} step {index}: out of memory: {detail}")


def _advance(task: Any, job_id: str, index: int) -> None:
    settings = get_settings()
    services = worker_services()
    retries = int(task.request.retries or 0)
    try:
        next_index = advance_in_a_row(
            job_id,
            index,
            services,
            owner=task.request.id,
            continue_s=settings.continue_inline_s,
            trust_pickle=settings.trust_pickle,
            cache=worker_step_cache(),
            # This message's own retries are restarts too; MCAAS_TASK_MAX_RETRIES caps those.
            max_restarts=settings.max_redeliveries + retries,
        )
        if next_index is not None:
            dispatcher = CeleryDispatcher(task.app, queue=settings.queue)
            hand_off(job_id, next_index, jobs=services.jobs, enqueue=dispatcher.enqueue)
    except Exception as exc:
        if isinstance(exc, MemoryError) or (
            not isinstance(exc, TransientInfraError) and not is_transient(exc)
        ):
            raise
        if broker_failed(exc):
            # Redis itself failed (e.g. while queueing the next step): self.retry would have to
            # publish through it, and when that fails Celery drops the message. Give it back
            # instead: it is requeued once the connection returns (or restored after the
            # visibility timeout) and the step re-runs idempotently.
            logger.warning("job %s step %d: broker error, message requeued: %s", job_id, index, exc)
            raise Reject(exc, requeue=True) from exc
        if retries >= settings.task_max_retries:
            fail_job(
                services,
                job_id,
                f"step {index}: infrastructure error after {retries} retries: {exc}",
            )
            raise
        logger.warning("job %s step %d: transient error, retry %d: %s", job_id, index, retries, exc)
        raise task.retry(exc=exc, countdown=backoff_s(retries)) from exc
