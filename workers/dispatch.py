"""Dispatchers: how a job's steps get run. One interface, three ways, chosen by settings.

* CeleryDispatcher: one `mcaas.run_step` task per step on the Redis broker; each task
  queues the next (self-continuation), so a job is a chain that a failed gate ends.
* EcsDispatcher: one ECS RunTask per step, with the seed service's env-var contract
  (MODEL_BUCKET, MODEL_S3_KEY, USER_ID, PROFILE, JOB_ID, STEP, STEP_PARAMS) plus
  STEP_INDEX and DATASET; the container (`python -m workers.ecs_entry`) queues the next.
* InlineDispatcher: the same steps in a background thread of this process (embedded mode).

Only ids cross a process boundary; every runner re-reads the job from the job store.
"""

from __future__ import annotations

import json
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from modules.core.jobspec import DEFAULT_PROFILE
from modules.core.records import JobRecord
from modules.errors import McaasError, NotFoundError
from modules.pipeline.engine import Dispatcher, advance_to_end
from modules.pipeline.settings import Services, Settings
from modules.storage.artifacts import S3Store
from workers.names import TASK_NAME

logger = logging.getLogger(__name__)

__all__ = [
    "TASK_NAME",
    "CeleryDispatcher",
    "DispatchError",
    "Dispatcher",
    "EcsDispatcher",
    "InlineDispatcher",
    "make_dispatcher",
]


class DispatchError(McaasError):
    """The job could not be handed to its runner (broker or ECS refused it)."""

    code = "dispatch"


# Redis serves priority 0 first. A job's next step goes ahead of jobs not yet started, so
# under a burst jobs finish one after another instead of all at the end.
NEXT_STEP_PRIORITY = 0
NEW_JOB_PRIORITY = 6


class CeleryDispatcher:
    """Sends `mcaas.run_step(job_id, index)` by name, so the sender never imports the task."""

    def __init__(self, app: Any, *, queue: str) -> None:
        self.app = app
        self.queue = queue

    def submit(self, job_id: str) -> None:
        """Queue step 0."""
        self.enqueue(job_id, 0)

    def enqueue(self, job_id: str, index: int) -> None:
        """Send one task with JSON args (ids only)."""
        priority = NEXT_STEP_PRIORITY if index > 0 else NEW_JOB_PRIORITY
        self.app.send_task(TASK_NAME, args=[job_id, index], queue=self.queue, priority=priority)

    def terminate(self, job: JobRecord) -> None:
        """Revoke the message that runs the job's steps, killing the pool process that runs
        it (billiard replaces it): a step that never checks for a stop would otherwise hold
        the worker until the hard time limit. A queued message is dropped when it arrives."""
        if not job.owner:
            return
        try:
            self.app.control.revoke(job.owner, terminate=True, signal="SIGKILL")
        except Exception:
            # The job is STOPPED either way; its step then ends at the next stop check or
            # at the hard time limit.
            logger.exception("job %s: could not revoke task %s", job.job_id, job.owner)


def _csv(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


class EcsDispatcher:
    """One ECS RunTask per step with the env-var contract as container overrides."""

    def __init__(self, settings: Settings, services: Services, *, client: Any = None) -> None:
        settings.require("worker")
        if not isinstance(services.store, S3Store):
            raise DispatchError("the ECS dispatcher needs an S3 store (MCAAS_STORE_URL=s3://...)")
        self.settings = settings
        self.services = services
        self._client = client

    @property
    def client(self) -> Any:
        """The boto3 ECS client, created on first use (honours AWS_ENDPOINT_URL)."""
        if self._client is None:
            import boto3

            self._client = boto3.client("ecs", region_name=self.settings.aws_region)
        return self._client

    def submit(self, job_id: str) -> None:
        """Run step 0."""
        self.enqueue(job_id, 0)

    def environment(self, job_id: str, index: int) -> dict[str, str]:
        """The container env for step `index`: its input key is the previous step's output."""
        job = self.services.jobs.get(job_id)
        if job is None:
            raise NotFoundError(f"job {job_id!r} not found")
        spec = job.spec
        if not 0 <= index < len(spec["steps"]):
            raise DispatchError(f"job {job_id} has {len(spec['steps'])} steps; no step {index}")
        call = spec["steps"][index]
        if index == 0:
            model_key = spec.get("model") or ""
        else:
            previous = self.services.log.get(job_id, index - 1)
            if previous is None:
                raise DispatchError(f"job {job_id}: step {index - 1} has no record yet")
            model_key = previous.output_key or ""
        profile = spec.get("profile", DEFAULT_PROFILE)
        bucket = self.services.store.bucket  # type: ignore[attr-defined]
        return {
            "MODEL_BUCKET": bucket,
            "MODEL_S3_KEY": model_key,
            "USER_ID": job.user_id,
            "PROFILE": profile if isinstance(profile, str) else json.dumps(profile),
            "JOB_ID": job_id,
            "STEP": call["name"],
            "STEP_PARAMS": json.dumps(call.get("params", {}), sort_keys=True),
            "STEP_INDEX": str(index),
            "DATASET": spec.get("dataset", "digits"),
        }

    def enqueue(self, job_id: str, index: int) -> None:
        """Call ecs.run_task; ECS's own `failures` list becomes a DispatchError."""
        env = self.environment(job_id, index)
        s = self.settings
        response = self.client.run_task(
            cluster=s.ecs_cluster,
            taskDefinition=s.ecs_task_definition,
            launchType=s.ecs_launch_type,
            count=1,
            startedBy=f"mcaas-{job_id}"[:36],
            networkConfiguration={
                "awsvpcConfiguration": {
                    "subnets": _csv(s.ecs_subnets),
                    "securityGroups": _csv(s.ecs_security_groups),
                    "assignPublicIp": "DISABLED",
                }
            },
            overrides={
                "containerOverrides": [
                    {
                        "name": s.ecs_container,
                        "environment": [{"name": k, "value": v} for k, v in env.items()],
                    }
                ]
            },
        )
        failures = response.get("failures") or []
        if failures or not response.get("tasks"):
            raise DispatchError(f"ECS RunTask for job {job_id} step {index} failed: {failures}")
        arns = [task["taskArn"] for task in response["tasks"]]
        current = self.services.jobs.get(job_id)
        earlier = (current.model_extra or {}).get("ecs_tasks", []) if current is not None else []
        self.services.jobs.update(job_id, ecs_tasks=[*earlier, *arns])

    def terminate(self, job: JobRecord) -> None:
        """StopTask on the job's latest ECS task (the one that runs its current step)."""
        arns = (job.model_extra or {}).get("ecs_tasks") or []
        if not arns:
            return
        try:
            self.client.stop_task(
                cluster=self.settings.ecs_cluster, task=arns[-1], reason="stopped by the user"
            )
        except Exception:
            logger.exception("job %s: could not stop ECS task %s", job.job_id, arns[-1])


class InlineDispatcher:
    """Runs the steps in one background thread of this process, one job after another."""

    def __init__(
        self, services: Services, *, trust_pickle: bool = False, background: bool = True
    ) -> None:
        self.services = services
        self.trust_pickle = trust_pickle
        self.background = background
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def submit(self, job_id: str) -> None:
        """Run the job from step 0."""
        self.enqueue(job_id, 0)

    def enqueue(self, job_id: str, index: int) -> None:
        """Run from step `index` to the end: now, or on the background thread."""
        if not self.background:
            self._run(job_id, index)
            return
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mcaas")
            future: Future[None] = self._executor.submit(self._run, job_id, index)
        future.add_done_callback(_log_crash)

    def _run(self, job_id: str, index: int) -> None:
        advance_to_end(job_id, index, self.services, trust_pickle=self.trust_pickle)

    def shutdown(self, *, wait: bool = True) -> None:
        """Stop the background thread (after the running jobs when `wait`)."""
        with self._lock:
            if self._executor is not None:
                self._executor.shutdown(wait=wait, cancel_futures=not wait)
                self._executor = None


def _log_crash(future: Future[None]) -> None:
    exc = future.exception()
    if exc is not None:
        # the engine already marked the job FAILED; the trace belongs in the server log.
        logger.error("inline job crashed", exc_info=exc)


def make_dispatcher(settings: Settings, services: Services) -> Dispatcher:
    """The dispatcher MCAAS_DISPATCHER names."""
    if settings.dispatcher == "celery":
        from workers.celery_app import make_celery

        return CeleryDispatcher(make_celery(settings), queue=settings.queue)
    if settings.dispatcher == "ecs":
        return EcsDispatcher(settings, services)
    return InlineDispatcher(services, trust_pickle=settings.trust_pickle)
