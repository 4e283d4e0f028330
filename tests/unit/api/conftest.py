"""An embedded API (local store, SQLite jobs, CSV log, inline dispatcher) and tiny models."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from modules.pipeline.settings import Settings

ALICE = {"X-API-Key": "alice-key-0001"}
BOB = {"X-API-Key": "bob-key-00002"}
TERMINAL = {"COMPLETED", "FAILED", "REJECTED", "STOPPED"}
SECRET = "s" * 40  # the dashboard's session secret in these tests


def make_settings(root: Path, **over: Any) -> Settings:
    values: dict[str, Any] = {
        "store_url": str(root / "store"),
        "jobs_db": root / "jobs.sqlite",
        "csv_log": root / "steps.csv",
        "api_keys": "alice-key-0001:alice,bob-key-00002:bob",
        "max_upload_mb": 1.0,
    }
    values.update(over)
    return Settings(**values)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def ui_settings(tmp_path: Path) -> Settings:
    """Settings with the dashboard on (a session secret)."""
    return make_settings(tmp_path, session_secret=SECRET)


@pytest.fixture
def ui(ui_settings: Settings) -> Iterator[TestClient]:
    """A client of the dashboard that does not follow redirects (tests look at them)."""
    with TestClient(create_app(ui_settings), follow_redirects=False) as client:
        yield client


@pytest.fixture(scope="session")
def torch_model_bytes() -> bytes:
    from modules.storage.datasets import load_dataset
    from modules.storage.model_formats import save_model
    from modules.training.train import TrainParams, train_baseline

    params = TrainParams(model="mlp", epochs=1, arch={"name": "mlp", "hidden": [16]})
    artifact, _ = train_baseline(params, load_dataset("digits"), seed=0)
    return save_model(artifact)


@pytest.fixture(scope="session")
def sklearn_model_bytes() -> bytes:
    from modules.storage.datasets import load_dataset
    from modules.storage.model_formats import save_model
    from modules.training.train import TrainParams, train_baseline

    artifact, _ = train_baseline(TrainParams(model="knn"), load_dataset("digits"), seed=0)
    return save_model(artifact)


@dataclass
class Api:
    """The test client plus the few calls most tests repeat."""

    client: TestClient
    settings: Settings

    def upload(self, data: bytes, name: str = "model.pt", headers: Any = None) -> Any:
        files = {"file": (name, data)}
        return self.client.post("/v1/models", headers=headers or ALICE, files=files)

    def submit(self, body: dict[str, Any], headers: Any = None) -> Any:
        return self.client.post("/v1/jobs", headers=headers or ALICE, json=body)

    def wait_for(self, job_id: str, headers: Any = None) -> dict[str, Any]:
        """Poll a job until it ends (the inline dispatcher runs it on a background thread)."""
        deadline = time.monotonic() + 60
        job: dict[str, Any] = {}
        while time.monotonic() < deadline:
            job = self.client.get(f"/v1/jobs/{job_id}", headers=headers or ALICE).json()
            if job["status"] in TERMINAL:
                return job
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} did not finish: {job}")

    def stored_keys(self) -> list[str]:
        root = Path(str(self.settings.store_url))
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


@pytest.fixture
def api(client: TestClient, settings: Settings) -> Api:
    return Api(client, settings)
