"""The app as a whole: import cost, start-up checks, error shape, auth, catalog, health."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from modules.pipeline.settings import Settings, SettingsError

ALICE = {"X-API-Key": "alice-key-0001"}
ROOT = Path(__file__).resolve().parents[3]


def test_importing_the_api_does_not_import_torch() -> None:
    code = (
        "import sys, api.main\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'onnxruntime'})\n"
        "assert not heavy, heavy\n"
        "print('ok')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_start_up_names_a_missing_setting(tmp_path: Path) -> None:
    settings = Settings(store_url=str(tmp_path), jobs_db=tmp_path / "j.sqlite", csv_log=None)
    with pytest.raises(SettingsError) as caught, TestClient(create_app(settings)):
        pass
    message = str(caught.value)
    assert "MCAAS_API_KEYS" in message and "MCAAS_CSV_LOG" in message


def test_uvicorn_start_up_fails_with_the_setting_named(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "MCAAS_STORE_URL": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "uvicorn", "api.main:app", "--port", "0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "MCAAS_JOBS_TABLE (or MCAAS_JOBS_DB)" in result.stderr
    assert "MCAAS_API_KEYS" in result.stderr


def test_errors_share_one_json_shape(api) -> None:
    missing = api.client.get("/v1/nothing-here", headers=ALICE)
    assert missing.status_code == 404
    assert missing.json() == {"error": {"code": "not_found", "message": "Not Found"}}
    wrong_method = api.client.delete("/v1/jobs", headers=ALICE)
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["code"] == "method_not_allowed"
    no_key = api.client.get("/v1/jobs")
    assert no_key.status_code == 401
    assert no_key.json()["error"]["message"].startswith("missing API key")
    assert no_key.headers["www-authenticate"] == "ApiKey"


def test_unexpected_errors_are_500_without_details(settings: Settings) -> None:
    app = create_app(settings)

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret detail at /srv/app/internal.py")

    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/boom")
    assert response.status_code == 500
    assert response.json() == {"error": {"code": "internal", "message": "internal server error"}}
    assert "secret" not in response.text


def test_api_keys_map_to_users(api) -> None:
    assert api.client.get("/v1/jobs", headers={"X-API-Key": "alice-key-000"}).status_code == 401
    assert api.client.get("/v1/jobs", headers={"X-API-Key": "x" * 10_000}).status_code == 401
    assert api.client.get("/v1/jobs", headers=ALICE).status_code == 200


def test_steps_and_profiles_catalog(api) -> None:
    assert api.client.get("/v1/steps").status_code == 401
    steps = api.client.get("/v1/steps", headers=ALICE).json()
    by_name = {step["name"]: step for step in steps["data"]}
    assert steps["count"] == len(by_name)
    assert {"train", "measure"} <= set(by_name)
    measure = by_name["measure"]
    assert measure["params_schema"]["additionalProperties"] is False
    assert "runs" in measure["params_schema"]["properties"]
    assert set(measure["accepts"]) == {"torch", "sklearn", "onnx"}
    profiles = api.client.get("/v1/profiles", headers=ALICE).json()
    names = {p["name"] for p in profiles["data"]}
    assert {"edge-8mb", "mcu-256kb"} <= names
    assert profiles["count"] == len(names)


def test_health_and_readiness(api) -> None:
    assert api.client.get("/healthz").json() == {"status": "ok"}
    ready = api.client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "checks": {"store": "ok"}}


def test_readiness_reports_a_dead_broker(tmp_path: Path) -> None:
    settings = Settings(
        store_url=str(tmp_path / "store"),
        jobs_db=tmp_path / "jobs.sqlite",
        csv_log=tmp_path / "steps.csv",
        api_keys="alice-key-0001:alice",
        dispatcher="celery",
        redis_url="redis://127.0.0.1:1/0",
    )
    with TestClient(create_app(settings)) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["error"]["code"] == "not_ready" and "redis" in body["error"]["message"]
    assert body["checks"]["store"] == "ok"
    assert body["checks"]["redis"].startswith("unavailable")


def test_a_job_that_cannot_be_queued_is_503_and_marked_failed(tmp_path: Path) -> None:
    settings = Settings(
        store_url=str(tmp_path / "store"),
        jobs_db=tmp_path / "jobs.sqlite",
        csv_log=tmp_path / "steps.csv",
        api_keys="alice-key-0001:alice",
        dispatcher="celery",
        redis_url="redis://127.0.0.1:1/0",
    )
    with TestClient(create_app(settings)) as client:
        response = client.post(
            "/v1/jobs", headers=ALICE, json={"steps": [{"name": "train", "params": {}}]}
        )
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "unavailable"
        (job,) = client.get("/v1/jobs", headers=ALICE).json()["data"]
    assert job["status"] == "FAILED" and job["reason"] == "the job could not be queued"
