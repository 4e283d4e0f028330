"""Per-user limits (jobs, uploads, bytes stored) and the dashboard's login throttle: 429
with Retry-After and a message naming the limit; other users unaffected."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from api.quotas import SlidingWindow
from modules.core.jobspec import parse_job_spec
from modules.core.records import JobRecord, JobStatus
from modules.pipeline.settings import Settings, build_services
from tests.unit.api.conftest import ALICE, BOB, make_settings

KNN_JOB = {"dataset": "digits", "steps": [{"name": "train", "params": {"model": "knn"}}]}


def app_client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), follow_redirects=False) as client:
        yield client


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[tuple[TestClient, Settings]]:
    settings = make_settings(
        tmp_path,
        max_concurrent_jobs=1,
        max_queued_jobs=2,
        uploads_per_minute=2,
        login_attempts_per_minute=2,
        session_secret="s" * 40,
    )
    for client in app_client(settings):
        yield client, settings


def store_jobs(settings: Settings, user: str, *, queued: int = 0, running: int = 0) -> None:
    """Jobs in the store as a worker would have left them (none of them runs here)."""
    services = build_services(settings)
    for n in range(queued + running):
        spec = parse_job_spec({"user_id": user, "job_id": f"{user}job{n:03d}", **KNN_JOB})
        assert services.jobs.create(JobRecord.new(spec))
        if n >= queued:
            assert services.jobs.begin_step(spec.job_id, 0) is not None


def assert_429(response: Any, *names: str) -> dict[str, Any]:
    assert response.status_code == 429, response.text
    assert int(response.headers["retry-after"]) >= 1
    body: dict[str, Any] = response.json()
    assert body["error"]["code"] == "quota_exceeded"
    for name in names:
        assert name in body["error"]["message"]
    return body


def test_a_full_queue_refuses_new_jobs_for_that_user_only(limited) -> None:
    client, settings = limited
    store_jobs(settings, "alice", queued=2)
    body = assert_429(client.post("/v1/jobs", headers=ALICE, json=KNN_JOB), "MCAAS_MAX_QUEUED_JOBS")
    assert "limit of 2 queued jobs" in body["error"]["message"]
    jobs = client.get("/v1/jobs", headers=ALICE).json()["data"]
    assert len(jobs) == 2  # nothing stored for the refused job
    assert client.post("/v1/jobs", headers=BOB, json=KNN_JOB).status_code == 202


def test_running_jobs_count_against_the_concurrent_limit(limited) -> None:
    client, settings = limited
    store_jobs(settings, "alice", queued=1, running=2)
    assert_429(client.post("/v1/jobs", headers=ALICE, json=KNN_JOB), "MCAAS_MAX_CONCURRENT_JOBS")


def test_jobs_that_ended_do_not_count(limited) -> None:
    client, settings = limited
    store_jobs(settings, "alice", queued=2)
    services = build_services(settings)
    for job in services.jobs.list("alice")[0]:
        services.jobs.update(job.job_id, status=JobStatus.FAILED.value, reason="test")
    assert client.post("/v1/jobs", headers=ALICE, json=KNN_JOB).status_code == 202


def test_uploads_per_minute_are_limited_before_the_file_is_read(limited) -> None:
    client, _ = limited
    for _ in range(2):  # refused as files, but each counts
        bad = client.post("/v1/models", headers=ALICE, files={"file": ("m.pt", b"not a model")})
        assert bad.status_code in {400, 422}
    third = client.post("/v1/inputs", headers=ALICE, files={"file": ("x.npz", b"junk")})
    assert_429(third, "MCAAS_UPLOADS_PER_MINUTE", "2 uploads per minute")
    other = client.post("/v1/models", headers=BOB, files={"file": ("m.pt", b"not a model")})
    assert other.status_code in {400, 422}


def test_bytes_stored_are_capped(tmp_path: Path, sklearn_model_bytes: bytes) -> None:
    cap_mb = 1.5 * len(sklearn_model_bytes) / 2**20
    settings = make_settings(tmp_path, max_stored_mb=cap_mb)
    for client in app_client(settings):
        files = {"file": ("m.skops", sklearn_model_bytes)}
        assert client.post("/v1/models", headers=ALICE, files=files).status_code == 201
        before = sorted(p for p in Path(str(settings.store_url)).rglob("*") if p.is_file())
        assert_429(client.post("/v1/models", headers=ALICE, files=files), "MCAAS_MAX_STORED_MB")
        after = sorted(p for p in Path(str(settings.store_url)).rglob("*") if p.is_file())
        assert after == before
        assert client.post("/v1/models", headers=BOB, files=files).status_code == 201


def test_failed_logins_are_throttled_per_key_then_per_address(limited) -> None:
    client, _ = limited
    for _ in range(2):
        assert client.post("/ui/login", data={"api_key": "wrong-key-one"}).status_code == 401
    same_key = client.post("/ui/login", data={"api_key": "wrong-key-one"})
    assert same_key.status_code == 429
    assert "Too many login attempts" in same_key.text and "with this key" in same_key.text
    assert int(same_key.headers["retry-after"]) >= 1
    for _ in range(2):  # other keys from the same address, up to its 2 x 2 failures
        assert client.post("/ui/login", data={"api_key": "wrong-key-two"}).status_code == 401
    blocked = client.post("/ui/login", data={"api_key": ALICE["X-API-Key"]})
    assert blocked.status_code == 429 and "from this address" in blocked.text


def test_logins_per_user_are_throttled(limited) -> None:
    client, _ = limited
    for _ in range(2):
        assert client.post("/ui/login", data={"api_key": ALICE["X-API-Key"]}).status_code == 303
    third = client.post("/ui/login", data={"api_key": ALICE["X-API-Key"]})
    assert third.status_code == 429 and "for this user" in third.text
    assert client.post("/ui/login", data={"api_key": BOB["X-API-Key"]}).status_code == 303


def test_the_sliding_window_frees_a_slot_once_the_oldest_event_is_a_minute_old() -> None:
    now = [1000.0]
    window = SlidingWindow(2, clock=lambda: now[0])
    assert window.hit("u") is None
    now[0] += 10
    assert window.hit("u") is None
    assert window.hit("u") == pytest.approx(50.0)
    assert window.retry_after("other") is None
    now[0] += 50.5
    assert window.retry_after("u") is None
    assert window.hit("u") is None


def test_the_window_forgets_the_oldest_keys_past_its_size() -> None:
    window = SlidingWindow(1, max_keys=3)
    for key in "abcd":
        assert window.hit(key) is None
    assert window.hit("a") is None  # forgotten: a fresh window
    assert window.hit("d") is not None
