"""Jobs that attack the worker: past the memory cap, killing their own process, holding
the CPU after a stop. Each must end with a clear status and leave the worker serving the
next job (a real Celery worker on Redis, moto for S3 and DynamoDB, uvicorn for the stop).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.devstack import DevStack, Process
from tests.integration.faults.conftest import TERMINAL, dump_result, submit_job, wait_until
from tests.integration.faults.hostile_steps import (
    ALLOCATE,
    HOLD_CPU,
    KILL_SELF,
    register_hostile_steps,
    unregister_hostile_steps,
)

pytestmark = pytest.mark.integration

HOSTILE_WORKER = ("-I", "tests.integration.faults.hostile_worker_steps")
# The pool process starts with about 1 GiB of address space mapped (torch, NumPy, ONNX
# Runtime); 2 GiB leaves a normal small job room and refuses a 3 GiB array at once.
MEMORY_CAP_MB = 2048
QUICK_JOB = [
    {
        "name": "train",
        "params": {"model": "mlp", "epochs": 2, "arch": {"name": "mlp", "hidden": [32]}},
    },
    {"name": "measure", "params": {"runs": 3, "warmup": 1}},
]
ALICE = {"X-API-Key": "dev-key-alice-0001"}


@pytest.fixture
def hostile_steps() -> Iterator[None]:
    """The hostile steps in this process too (job specs are checked against the registry)."""
    register_hostile_steps()
    try:
        yield
    finally:
        unregister_hostile_steps()


def pool_children(worker: Process) -> list[int]:
    path = Path(f"/proc/{worker.popen.pid}/task/{worker.popen.pid}/children")
    return [int(pid) for pid in path.read_text().split()]


def status_kib(pid: int, field: str) -> int:
    """A /proc/PID/status memory field (VmHWM: peak resident set) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for pid {pid}")


def ended(services: Any, job_id: str, *, timeout_s: float) -> Any:
    return wait_until(
        lambda: (job := services.jobs.get(job_id)).status in TERMINAL and job,
        timeout_s=timeout_s,
        every_s=0.2,
        what=f"job {job_id} to end",
    )


class SecondUser:
    """Bob's normal job, submitted while an attack holds the worker; it must complete."""

    def __init__(self, stack: DevStack) -> None:
        self.stack = stack
        self.started = time.monotonic()
        self.services, self.job_id = submit_job(stack, QUICK_JOB, user="bob")

    def completed_s(self, worker: Process) -> float:
        job = ended(self.services, self.job_id, timeout_s=180)
        assert job.status == "COMPLETED", job.reason
        assert worker.alive(), worker.log_tail()
        assert "Unrecoverable error" not in worker.log_tail(1_000_000)
        return time.monotonic() - self.started


def normal_job_s(stack: DevStack, worker: Process) -> float:
    """The same normal job alone on the worker afterwards: its normal time."""
    return SecondUser(stack).completed_s(worker)


def peak_rss_mb(worker: Process) -> dict[str, float]:
    """Peak resident memory of the worker's main process and of its pool process now."""
    out = {"worker_main_peak_rss_mb": status_kib(worker.popen.pid, "VmHWM") / 1024}
    children = pool_children(worker)
    if children:
        out["pool_peak_rss_mb"] = max(status_kib(pid, "VmHWM") for pid in children) / 1024
    return out


def test_a_job_past_the_memory_cap_fails_and_the_worker_serves_the_next(
    fault_stack: DevStack, hostile_steps: None
) -> None:
    fault_stack.overrides["MCAAS_WORKER_MEMORY_LIMIT_MB"] = str(MEMORY_CAP_MB)
    fault_stack.service_env()
    worker = fault_stack.start_worker(extra_args=HOSTILE_WORKER)

    def address_caps() -> list[str]:
        caps = []
        for pid in pool_children(worker):
            limits = Path(f"/proc/{pid}/limits").read_text()
            (row,) = [r for r in limits.splitlines() if r.startswith("Max address space")]
            caps.append(row.split()[3])
        return caps

    # A pool process applies its cap in worker_process_init, just after the fork.
    wait_until(
        lambda: (caps := address_caps()) and set(caps) == {str(MEMORY_CAP_MB * 2**20)},
        timeout_s=30,
        what=f"every pool process capped at {MEMORY_CAP_MB} MiB",
    )

    started = time.monotonic()
    services, job_id = submit_job(fault_stack, [{"name": ALLOCATE, "params": {"megabytes": 3072}}])
    bob = SecondUser(fault_stack)
    job = ended(services, job_id, timeout_s=120)
    held_s = time.monotonic() - started

    assert job.status == "FAILED"
    assert "step 0 (h_allocate) ran out of memory" in job.reason
    assert worker.alive(), worker.log_tail()
    rss = peak_rss_mb(worker)
    assert rss["pool_peak_rss_mb"] < MEMORY_CAP_MB, rss
    bob_s = bob.completed_s(worker)

    # A job within the cap runs, and sees the pool shape the worker exported.
    services, small = submit_job(fault_stack, [{"name": ALLOCATE, "params": {"megabytes": 64}}])
    assert ended(services, small, timeout_s=120).status == "COMPLETED"
    (record,) = services.log.records(small)
    cpus = len(os.sched_getaffinity(0))
    assert record.metrics["allocated_bytes"] == 64 * 2**20
    assert (record.metrics["worker_concurrency"], record.metrics["worker_cpus"]) == ("1", str(cpus))
    assert record.metrics["torch_threads"] == cpus
    dump_result(
        "attack_memory_cap",
        {
            "attack": f"a step allocating 3072 MiB, pool process capped at {MEMORY_CAP_MB} MiB",
            "status": job.status,
            "reason": job.reason,
            "held_s": held_s,
            **rss,
            "second_user_job_s": bob_s,
            "normal_job_s": normal_job_s(fault_stack, worker),
        },
    )


def test_a_step_that_kills_its_worker_each_time_fails_past_the_redelivery_cap(
    fault_stack: DevStack, hostile_steps: None
) -> None:
    fault_stack.overrides["MCAAS_MAX_REDELIVERIES"] = "2"
    fault_stack.service_env()
    worker = fault_stack.start_worker(extra_args=HOSTILE_WORKER)

    started = time.monotonic()
    services, job_id = submit_job(fault_stack, [{"name": KILL_SELF, "params": {}}])
    bob = SecondUser(fault_stack)
    job = ended(services, job_id, timeout_s=180)
    held_s = time.monotonic() - started

    assert job.status == "FAILED"
    assert "was started again 3 times" in job.reason and "MCAAS_MAX_REDELIVERIES" in job.reason
    # Begun four times: three ran and killed their pool process, the fourth was refused.
    assert job.attempts == 4
    assert services.log.records(job_id) == []
    bob_s = bob.completed_s(worker)
    dump_result(
        "attack_kill_self",
        {
            "attack": "a step that SIGKILLs its own pool process, MCAAS_MAX_REDELIVERIES=2",
            "status": job.status,
            "reason": job.reason,
            "held_s": held_s,
            **peak_rss_mb(worker),
            "second_user_job_s": bob_s,
            "normal_job_s": normal_job_s(fault_stack, worker),
        },
    )


def test_stop_kills_a_step_that_never_checks_and_frees_the_worker(
    fault_stack: DevStack, hostile_steps: None
) -> None:
    # Limits far above the time the test allows, so only the stop can free the worker.
    fault_stack.overrides.update(
        {
            "MCAAS_TASK_SOFT_TIME_LIMIT_S": "600",
            "MCAAS_TASK_TIME_LIMIT_S": "620",
            "MCAAS_VISIBILITY_TIMEOUT_S": "700",
        }
    )
    fault_stack.service_env()
    worker = fault_stack.start_worker(extra_args=HOSTILE_WORKER)
    api_url = fault_stack.start_api()
    api = next(p for p in fault_stack.processes if p.name == "api")

    started = time.monotonic()
    services, job_id = submit_job(fault_stack, [{"name": HOLD_CPU, "params": {"seconds": 600}}])
    wait_until(
        lambda: services.jobs.get(job_id).status == "INPROGRESS",
        timeout_s=90,
        what="the spinning step to start",
    )
    bob = SecondUser(fault_stack)
    (spinning,) = pool_children(worker)
    response = httpx.post(f"{api_url}/v1/jobs/{job_id}/stop", headers=ALICE, timeout=30)
    stopped_at = time.monotonic()
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "STOPPED"

    wait_until(
        lambda: spinning not in pool_children(worker),
        timeout_s=60,
        what="the pool process running the stopped step to be killed",
    )
    freed_s = time.monotonic() - stopped_at
    bob_s = bob.completed_s(worker)
    served_after_stop_s = time.monotonic() - stopped_at
    # The step would have held the worker for 600 s and the hard limit is 620 s.
    assert served_after_stop_s < 300
    assert services.jobs.get(job_id).status == "STOPPED"
    dump_result(
        "attack_stop_spinning_step",
        {
            "attack": "a step spinning 600 s without a stop check, then POST /stop",
            "status": services.jobs.get(job_id).status,
            "held_s": stopped_at - started + freed_s,
            "freed_after_stop_s": freed_s,
            "api_peak_rss_mb": status_kib(api.popen.pid, "VmHWM") / 1024,
            **peak_rss_mb(worker),
            "second_user_job_s": bob_s,
            "normal_job_s": normal_job_s(fault_stack, worker),
        },
    )
