"""The API killed (-9) while jobs run, then started again: nothing is lost.

The API holds no job state: every status is read back from the job store, and the worker
never talks to the API, so jobs keep running while it is down.
"""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import pytest

from tests.devstack import DevStack
from tests.integration.faults.conftest import MEASURE, TRAIN, dump_result, wait_until

# Three jobs run to the end around the restart: over a minute, so not in the default run.
pytestmark = [pytest.mark.integration, pytest.mark.slow]

ALICE = {"X-API-Key": "dev-key-alice-0001"}
TERMINAL = {"COMPLETED", "FAILED", "REJECTED", "STOPPED"}


def test_jobs_outlive_an_api_restart(fault_stack: DevStack, tmp_path: Path) -> None:
    fault_stack.service_env()
    fault_stack.start_worker()
    first_url = fault_stack.start_api()
    with httpx.Client(base_url=first_url, timeout=30) as http:
        ids = []
        for _ in range(3):
            response = http.post("/v1/jobs", headers=ALICE, json={"steps": [TRAIN, MEASURE]})
            assert response.status_code == 202, response.text
            ids.append(response.json()["id"])
        wait_until(
            lambda: http.get(f"/v1/jobs/{ids[0]}", headers=ALICE).json()["status"] == "INPROGRESS",
            timeout_s=90,
            what="the first job to run",
        )
    api = next(p for p in fault_stack.processes if p.name == "api")
    api.stop(sig=signal.SIGKILL, timeout=5)
    assert not api.alive()

    second_url = fault_stack.start_api()
    with httpx.Client(base_url=second_url, timeout=30) as http:
        listed = {job["id"] for job in http.get("/v1/jobs", headers=ALICE).json()["data"]}
        assert set(ids) <= listed  # every job submitted to the dead API is known to the new one

        def all_ended() -> list[dict] | None:
            jobs = [http.get(f"/v1/jobs/{job_id}", headers=ALICE).json() for job_id in ids]
            return jobs if all(job["status"] in TERMINAL for job in jobs) else None

        jobs = wait_until(all_ended, timeout_s=300, every_s=0.5, what="every job to end")
    for job in jobs:
        assert job["status"] == "COMPLETED", job["reason"]
        assert [r["index"] for r in job["records"]] == [0, 1]
    dump_result("api_restart", {job["id"]: job["status"] for job in jobs})
