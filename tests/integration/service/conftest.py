"""The service as real processes: moto server, Redis, a Celery worker and uvicorn.

They start from docker-compose.yml's commands and .env.example's settings through
tests/devstack.py, the way compose would start them, once per test session. Redis is
the one at REDIS_URL (default redis://127.0.0.1:6379/11); if none answers a redis-server
is started; if that fails too, the tests fail loudly rather than skip.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from tests.devstack import DevStack, StackError

ALICE = {"X-API-Key": "dev-key-alice-0001"}
BOB = {"X-API-Key": "dev-key-bob-00002"}
TERMINAL = {"COMPLETED", "FAILED", "REJECTED", "STOPPED"}
SESSION_LIMITS = {
    "MCAAS_UPLOADS_PER_MINUTE": "10000",
    "MCAAS_MAX_QUEUED_JOBS": "1000",
    "MCAAS_MAX_CONCURRENT_JOBS": "1000",
    "MCAAS_LOGIN_ATTEMPTS_PER_MINUTE": "1000",
}


@dataclass
class Service:
    """A running stack and the clients a test needs to look at what it wrote."""

    stack: DevStack
    http: httpx.Client

    @property
    def env(self) -> dict[str, str]:
        return self.stack.env

    @property
    def bucket(self) -> str:
        return self.env["MODEL_BUCKET"]

    def s3(self) -> Any:
        return boto3.client("s3", endpoint_url=self.stack.moto_url, region_name="us-east-1")

    def dynamodb(self) -> Any:
        return boto3.client("dynamodb", endpoint_url=self.stack.moto_url, region_name="us-east-1")

    def keys(self, prefix: str = "users/") -> list[str]:
        pages = (
            self.s3().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        )
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def step_items(self, job_id: str) -> list[dict[str, Any]]:
        response = self.dynamodb().query(
            TableName=self.env["MCAAS_STEPS_TABLE"],
            KeyConditionExpression="job_id = :j",
            ExpressionAttributeValues={":j": {"S": job_id}},
            ConsistentRead=True,
        )
        items: list[dict[str, Any]] = response["Items"]
        return items

    def upload(self, data: bytes, name: str = "model.pt", headers: Any = None) -> httpx.Response:
        return self.http.post("/v1/models", headers=headers or ALICE, files={"file": (name, data)})

    def submit(self, body: dict[str, Any], headers: Any = None) -> httpx.Response:
        return self.http.post("/v1/jobs", headers=headers or ALICE, json=body)

    def wait_for(self, job_id: str, *, timeout_s: float = 120, headers: Any = None) -> Any:
        deadline = time.monotonic() + timeout_s
        job: Any = None
        while time.monotonic() < deadline:
            job = self.http.get(f"/v1/jobs/{job_id}", headers=headers or ALICE).json()
            if job["status"] in TERMINAL:
                return job
            time.sleep(0.2)
        logs = {p.name: p.log_tail(3000) for p in self.stack.processes}
        raise AssertionError(f"job {job_id} did not finish in {timeout_s} s: {job}\n{logs}")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The Redis at REDIS_URL, or one we start; fails (never skips) when neither works."""
    stack = DevStack(tmp_path_factory.mktemp("redis"))
    try:
        url = stack.ensure_redis()
    except StackError as exc:
        pytest.fail(f"integration tests need Redis: {exc}")
    try:
        yield url
    finally:
        stack.stop()


@pytest.fixture(scope="session")
def service(
    moto_endpoint: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    """api + worker started as compose would, against moto and Redis."""
    stack = DevStack(tmp_path_factory.mktemp("stack"), moto_url=moto_endpoint, redis_url=redis_url)
    # The API-keys table is optional in .env.example; these tests exercise it too.
    stack.overrides["MCAAS_API_KEYS_TABLE"] = f"mcaas-keys-{stack.run_id}"
    # A small cap keeps the over-the-limit upload test light.
    stack.overrides["MCAAS_MAX_UPLOAD_MB"] = "5"
    # One user runs the whole session's tests (and the dashboard's browser logins) on this
    # stack; the per-user limits have tests of their own (tests/unit/api/test_quotas.py).
    stack.overrides.update(SESSION_LIMITS)
    try:
        stack.service_env()
        stack.start_worker()
        url = stack.start_api()
    except StackError as exc:
        stack.stop()
        pytest.fail(f"could not start the service: {exc}")
    try:
        with httpx.Client(base_url=url, timeout=60) as http:
            yield Service(stack, http)
    finally:
        stack.stop()


@pytest.fixture(scope="session")
def torch_model_bytes() -> bytes:
    from modules.storage.datasets import load_dataset
    from modules.storage.model_formats import save_model
    from modules.training.train import TrainParams, train_baseline

    params = TrainParams(model="mlp", epochs=10, arch={"name": "mlp", "hidden": [64]})
    artifact, _ = train_baseline(params, load_dataset("digits"), seed=0)
    return save_model(artifact)


def csv_rows(path: Path, job_id: str) -> list[dict[str, str]]:
    import csv

    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return [row for row in csv.DictReader(handle) if row["job_id"] == job_id]


@pytest.fixture
def rows_of(service: Service):
    """CSV step-log rows of a job, from the file the worker and API share."""

    def rows(job_id: str) -> list[dict[str, str]]:
        return csv_rows(Path(service.env["MCAAS_CSV_LOG"]), job_id)

    return rows
