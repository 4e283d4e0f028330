"""Redis killed (-9) and started again while jobs are queued and running.

With the append-only file the compose file configures, queued steps survive the restart
and every job completes (or ends FAILED with a reason, never hangs). Without persistence
the queued step is gone; the watchdog on GET /v1/jobs/{id} then marks the job FAILED
once it has had no progress for longer than its limits allow.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.devstack import DevStack
from tests.integration.faults.conftest import (
    MEASURE,
    RedisServer,
    dump_result,
    orphan_keys,
    submit_job,
    wait_until,
)

pytestmark = pytest.mark.integration

ALICE = {"X-API-Key": "dev-key-alice-0001"}
TERMINAL = {"COMPLETED", "FAILED", "REJECTED", "STOPPED"}
TINY_TRAIN = {
    "name": "train",
    "params": {"model": "mlp", "epochs": 2, "arch": {"name": "mlp", "hidden": [32]}},
}


def poll_until_terminal(http: httpx.Client, job_id: str, *, timeout_s: float) -> dict[str, Any]:
    """GET the job through the API (where the watchdog runs) until it ends."""

    def ended() -> dict[str, Any] | None:
        response = http.get(f"/v1/jobs/{job_id}", headers=ALICE)
        job: dict[str, Any] = response.json() if response.status_code == 200 else {}
        return job if job.get("status") in TERMINAL else None

    result: dict[str, Any] = wait_until(
        ended, timeout_s=timeout_s, every_s=0.5, what=f"job {job_id}"
    )
    return result


def test_jobs_survive_a_redis_restart_with_its_append_only_file(
    moto_endpoint: str, tmp_path: Path
) -> None:
    redis = RedisServer(tmp_path / "redis", persistent=True)
    redis.start()
    stack = DevStack(tmp_path / "stack", moto_url=moto_endpoint, redis_url=redis.url)
    stack.overrides.update(
        {
            "MCAAS_TASK_SOFT_TIME_LIMIT_S": "45",
            "MCAAS_CONTINUE_INLINE_S": "20",
            "MCAAS_TASK_TIME_LIMIT_S": "50",
            "MCAAS_VISIBILITY_TIMEOUT_S": "60",
        }
    )
    try:
        stack.service_env()
        # Queued while no worker runs: these steps exist only in Redis.
        queued = [submit_job(stack, [TINY_TRAIN, MEASURE]) for _ in range(3)]
        redis.kill()
        redis.start()
        stack.start_worker()
        url = stack.start_api()
        # One more job, with Redis killed while it runs, down for three seconds.
        services, running = submit_job(stack, [TINY_TRAIN, MEASURE])
        wait_until(
            lambda: services.jobs.get(running).status == "INPROGRESS",
            timeout_s=120,
            what="the job to start",
        )
        redis.kill()
        time.sleep(3)
        redis.start()
        with httpx.Client(base_url=url, timeout=30) as http:
            outcomes = {
                job_id: poll_until_terminal(http, job_id, timeout_s=240)
                for _, job_id in [*queued, (services, running)]
            }
        for job_id, job in outcomes.items():
            assert job["status"] in {"COMPLETED", "FAILED"}, job
            if job["status"] == "FAILED":
                assert job["reason"], f"{job_id} failed without a reason"
        for _, job_id in queued:  # they never saw the outage while running: all complete
            assert outcomes[job_id]["status"] == "COMPLETED", outcomes[job_id]
            records = services.log.records(job_id)
            assert [r.index for r in records] == [0, 1]
            assert orphan_keys(stack, services, job_id) == []
        dump_result(
            "redis_restart_aof",
            {job_id: [job["status"], job["reason"]] for job_id, job in outcomes.items()},
        )
    finally:
        stack.stop()
        redis.kill()


def test_a_job_lost_with_a_non_persistent_redis_is_marked_failed(
    moto_endpoint: str, tmp_path: Path
) -> None:
    redis = RedisServer(tmp_path / "redis", persistent=False)
    redis.start()
    stack = DevStack(tmp_path / "stack", moto_url=moto_endpoint, redis_url=redis.url)
    # No step runs here, so the limits only set how soon the watchdog gives up: 8 + 2 s.
    stack.overrides.update(
        {
            "MCAAS_TASK_SOFT_TIME_LIMIT_S": "5",
            "MCAAS_CONTINUE_INLINE_S": "2",
            "MCAAS_TASK_TIME_LIMIT_S": "6",
            "MCAAS_VISIBILITY_TIMEOUT_S": "8",
        }
    )
    try:
        stack.service_env()
        services, job_id = submit_job(stack, [TINY_TRAIN, MEASURE])
        redis.kill()  # the queued step goes with it
        redis.start()
        stack.start_worker()
        url = stack.start_api()
        with httpx.Client(base_url=url, timeout=30) as http:
            job = poll_until_terminal(http, job_id, timeout_s=120)
        assert job["status"] == "FAILED"
        assert "no progress" in job["reason"] and "lost" in job["reason"]
        assert services.jobs.get(job_id).status == "FAILED"  # stored, not just shown
        assert services.log.records(job_id) == []
        dump_result("redis_restart_no_persistence", {job_id: [job["status"], job["reason"]]})
    finally:
        stack.stop()
        redis.kill()
