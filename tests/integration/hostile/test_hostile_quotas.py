"""Floods against the running API (uvicorn as compose starts it, default limits): one user's
burst of jobs and a burst of wrong dashboard logins are cut off with 429 + Retry-After."""

from __future__ import annotations

import httpx
import pytest

from modules.pipeline.settings import Settings

pytestmark = pytest.mark.integration

BOB = {"X-API-Key": "dev-key-bob-00002"}
JOB = {"dataset": "digits", "steps": [{"name": "train", "params": {"model": "knn"}}]}


def test_a_burst_of_jobs_is_cut_off_at_the_queue_limit(api: httpx.Client) -> None:
    limit = Settings().max_queued_jobs  # the default: this stack sets none
    # No worker runs on this stack: every accepted job stays QUEUED.
    statuses = [api.post("/v1/jobs", json=JOB, headers=BOB).status_code for _ in range(limit + 3)]
    assert statuses == [202] * limit + [429] * 3
    refused = api.post("/v1/jobs", json=JOB, headers=BOB)
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) >= 1
    assert "MCAAS_MAX_QUEUED_JOBS" in refused.json()["error"]["message"]
    listed = api.get("/v1/jobs", params={"limit": 100}, headers=BOB).json()
    assert listed["count"] == limit


def test_a_burst_of_wrong_logins_is_throttled(api: httpx.Client) -> None:
    per_address = 2 * Settings().login_attempts_per_minute
    statuses = [
        api.post("/ui/login", data={"api_key": f"guess-{n:04d}-xxxxxxxx"}).status_code
        for n in range(per_address + 5)
    ]
    assert statuses[:per_address] == [401] * per_address
    assert set(statuses[per_address:]) == {429}
    blocked = api.post("/ui/login", data={"api_key": "dev-key-bob-00002"})
    assert blocked.status_code == 429
    assert "from this address" in blocked.text
    assert int(blocked.headers["retry-after"]) >= 1
