"""A worker dying mid-step: the step is delivered again and runs once more, one record per step."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from modules.core.jobspec import parse_job_spec
from modules.core.records import JobRecord
from modules.pipeline.settings import Settings, build_services
from tests.devstack import DevStack, Process
from workers.dispatch import make_dispatcher

pytestmark = pytest.mark.integration

# Long enough (a few seconds on two cores) to be caught mid-step.
SLOW_TRAIN = {
    "name": "train",
    "params": {"model": "mlp", "epochs": 20, "arch": {"name": "mlp", "hidden": [256, 256]}},
}
MEASURE = {"name": "measure", "params": {"runs": 3, "warmup": 1}}


def pool_children(worker: Process) -> list[int]:
    """The prefork pool processes of a Celery worker (children of its main process)."""
    path = Path(f"/proc/{worker.popen.pid}/task/{worker.popen.pid}/children")
    return [int(pid) for pid in path.read_text().split()]


def wait_until(check: Any, *, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def running_first_try(services: Any, job_id: str) -> bool:
    job = services.jobs.get(job_id)
    return bool(
        job.status == "INPROGRESS"
        and job.step_index == 0
        and job.attempts == 1
        and services.log.get(job_id, 0) is None
    )


def assert_ran_once_per_step(services: Any, job_id: str, *, attempts: int) -> None:
    job = services.jobs.get(job_id)
    assert job.status == "COMPLETED", job.reason
    assert job.attempts == attempts  # step 0 started twice, step 1 once
    records = services.log.records(job_id)
    assert [(r.index, r.step) for r in records] == [(0, "train"), (1, "measure")]


def settings_of(stack: DevStack) -> Settings:
    return Settings(**{k: v for k, v in stack.env.items() if k.isupper()})


def submit(stack: DevStack) -> tuple[Any, str]:
    settings = settings_of(stack)
    services = build_services(settings)
    spec = parse_job_spec({"user_id": "alice", "steps": [SLOW_TRAIN, MEASURE]})
    services.jobs.create(JobRecord.new(spec))
    make_dispatcher(settings, services).submit(spec.job_id)
    return services, spec.job_id


def test_a_killed_pool_process_gets_its_step_redelivered(service) -> None:
    """acks_late + reject_on_worker_lost: the broker message comes back at once."""
    worker = next(p for p in service.stack.processes if p.name == "worker")
    services, job_id = submit(service.stack)
    wait_until(lambda: running_first_try(services, job_id), timeout_s=60, what="step 0 to start")
    (child,) = pool_children(worker)
    os.kill(child, signal.SIGKILL)
    wait_until(lambda: services.jobs.get(job_id).status == "COMPLETED", timeout_s=180, what="done")
    assert_ran_once_per_step(services, job_id, attempts=3)
    assert worker.alive()


def _other_db(url: str) -> str:
    """The same Redis, the next database: its own unacked-message bookkeeping."""
    parts = urlsplit(url)
    db = int(parts.path.strip("/") or 0)
    return urlunsplit(parts._replace(path=f"/{(db + 1) % 16}"))


@pytest.mark.slow
def test_a_dead_worker_host_gets_its_step_redelivered_to_another(
    moto_endpoint: str, redis_url: str, tmp_path: Path
) -> None:
    """The whole worker is killed: Redis hands the unacked step on after the visibility timeout."""
    stack = DevStack(tmp_path, moto_url=moto_endpoint, redis_url=_other_db(redis_url))
    stack.overrides.update(
        {
            # Limits far above the step's few seconds, even on a busy machine.
            "MCAAS_TASK_SOFT_TIME_LIMIT_S": "60",
            "MCAAS_CONTINUE_INLINE_S": "20",
            "MCAAS_TASK_TIME_LIMIT_S": "70",
            "MCAAS_VISIBILITY_TIMEOUT_S": "80",
        }
    )
    try:
        stack.service_env()
        first = stack.start_worker("worker-a")
        services, job_id = submit(stack)
        wait_until(lambda: running_first_try(services, job_id), timeout_s=60, what="step 0")
        first.stop(sig=signal.SIGKILL, timeout=5)
        assert not first.alive()
        stack.start_worker("worker-b")
        wait_until(
            lambda: services.jobs.get(job_id).status == "COMPLETED",
            timeout_s=180,
            what="the second worker to finish the job",
        )
        assert_ran_once_per_step(services, job_id, attempts=3)
    finally:
        stack.stop()
