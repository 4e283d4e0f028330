"""/v1/jobs over the embedded stack: submit, progress, records, stop, artifacts, report, scoping."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
from pydantic import BaseModel, ConfigDict, Field
from sklearn.neighbors import KNeighborsClassifier

from modules.core.artifact import ModelArtifact
from modules.core.registry import register_step, unregister_step
from modules.core.step import StepOutput, Verdict
from modules.errors import IncompatibleError

ALICE = {"X-API-Key": "alice-key-0001"}
BOB = {"X-API-Key": "bob-key-00002"}
RELEASE = threading.Event()
TRAIN = {"name": "train", "params": {"model": "knn"}}


class ToyParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    reason: str = Field(default="ok", max_length=200, description="Text the gate reports.")
    passed: bool = Field(default=True, description="Whether the gate passes.")


@pytest.fixture(autouse=True)
def toy_steps():
    @register_step("t_refit", params=ToyParams, accepts={"sklearn"})
    def refit(model, data, params, ctx):
        """Refit a 3-NN classifier and write report files."""
        est = KNeighborsClassifier(n_neighbors=3).fit(data.X_train, data.y_train)
        files = {"report.html": b"<p>from the report step</p>", "report.json": b'{"from": "step"}'}
        return StepOutput(model=ModelArtifact("sklearn", est), metrics={"n": 1}, files=files)

    @register_step("t_gate", params=ToyParams, accepts={"sklearn"}, gate=True)
    def gate(model, data, params, ctx):
        """Pass or fail as told."""
        return StepOutput(verdict=Verdict(params.passed, params.reason))

    @register_step("t_wait", params=ToyParams, accepts={"sklearn"})
    def wait(model, data, params, ctx):
        """Block until the test releases it."""
        RELEASE.wait(timeout=20)
        return StepOutput(metrics={"waited": True})

    @register_step("t_fail", params=ToyParams, accepts={"sklearn"})
    def fail(model, data, params, ctx):
        """Raise one of our errors."""
        raise IncompatibleError("model and data do not fit")

    @register_step("t_crash", params=ToyParams, accepts={"sklearn"})
    def crash(model, data, params, ctx):
        """Raise a bug."""
        raise RuntimeError("boom")

    RELEASE.clear()
    yield
    RELEASE.set()
    for name in ("t_refit", "t_gate", "t_wait", "t_fail", "t_crash"):
        unregister_step(name)


def test_job_runs_to_completion_with_records_and_progress(api) -> None:
    response = api.submit({"steps": [TRAIN, {"name": "t_refit"}], "profile": "mobile"})
    assert response.status_code == 202
    queued = response.json()
    assert queued["status"] in {"QUEUED", "INPROGRESS", "COMPLETED"}
    assert queued["progress"]["total"] == 2
    assert [s["name"] for s in queued["steps"]] == ["train", "t_refit"]
    job = api.wait_for(queued["id"])
    assert job["status"] == "COMPLETED" and job["reason"] is None
    assert job["progress"] == {"done": 2, "total": 2, "current": None, "current_step": None}
    assert job["attempts"] == 2  # one task start per step
    assert job["created_at"] <= job["updated_at"]
    records = job["records"]
    assert [(r["index"], r["step"]) for r in records] == [(0, "train"), (1, "t_refit")]
    for record in records:
        assert record["user_id"] == "alice" and record["profile"] == "mobile"
        assert record["output_size"] > 0
        assert record["dataset"]["fingerprint"]
        assert record["output_key"].startswith(f"users/alice/mobile/{job['id']}/")


def test_artifacts_and_report_files(api) -> None:
    job_id = api.submit({"steps": [TRAIN, {"name": "t_refit"}]}).json()["id"]
    api.wait_for(job_id)
    body = api.client.get(f"/v1/jobs/{job_id}/artifacts", headers=ALICE).json()
    by_name = {(a["step"], a["name"]): a for a in body["data"]}
    assert set(by_name) == {
        ("train", "model.skops"),
        ("t_refit", "model.skops"),
        ("t_refit", "report.html"),
        ("t_refit", "report.json"),
        (None, "report.json"),
    }
    for artifact in body["data"]:
        assert artifact["key"].startswith("users/alice/")
        path = Path(urlparse(artifact["url"]).path)
        assert path.is_file() and path.stat().st_size == artifact["size"]
    # As html, the report step's page; as json, the job's one report.json, as stored.
    html = api.client.get(f"/v1/jobs/{job_id}/report?format=html", headers=ALICE)
    assert html.text == "<p>from the report step</p>"
    assert "default-src 'none'" in html.headers["content-security-policy"]
    report = api.client.get(f"/v1/jobs/{job_id}/report", headers=ALICE).json()
    stored = by_name[(None, "report.json")]
    assert report == json.loads(Path(urlparse(stored["url"]).path).read_bytes())
    assert report["status"] == "COMPLETED" and len(report["steps"]) == 2


def test_failed_gate_rejects_and_report_escapes(api) -> None:
    reason = "<script>alert(1)</script> accuracy too low"
    steps = [TRAIN, {"name": "t_gate", "params": {"passed": False, "reason": reason}}, TRAIN]
    job = api.wait_for(api.submit({"steps": steps}).json()["id"])
    assert job["status"] == "REJECTED"
    assert reason in job["reason"]
    assert [r["step"] for r in job["records"]] == ["train", "t_gate"]  # the chain stopped
    assert job["progress"]["done"] == 2
    report = api.client.get(f"/v1/jobs/{job['id']}/report", headers=ALICE).json()
    assert report["status"] == "REJECTED"
    assert [row["step"] for row in report["summary"]] == ["train", "t_gate"]
    html = api.client.get(f"/v1/jobs/{job['id']}/report?format=html", headers=ALICE).text
    assert "<script>" not in html and "&lt;script&gt;" in html


@pytest.mark.parametrize(
    ("step", "expected"),
    [("t_fail", "failed: model and data do not fit"), ("t_crash", "crashed: RuntimeError: boom")],
)
def test_step_errors_fail_the_job_with_a_reason(api, step: str, expected: str) -> None:
    job = api.wait_for(api.submit({"steps": [TRAIN, {"name": step}]}).json()["id"])
    assert job["status"] == "FAILED"
    assert f"step 1 ({step}) {expected}" in job["reason"]
    assert "Traceback" not in job["reason"]


def test_stop_a_running_job(api) -> None:
    job_id = api.submit({"steps": [TRAIN, {"name": "t_wait"}, {"name": "t_refit"}]}).json()["id"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        running = api.client.get(f"/v1/jobs/{job_id}", headers=ALICE).json()
        if running["progress"]["current_step"] == "t_wait":
            break
        time.sleep(0.05)
    assert running["status"] == "INPROGRESS"
    so_far = api.client.get(f"/v1/jobs/{job_id}/report", headers=ALICE).json()
    assert so_far["status"] == "INPROGRESS" and [r["step"] for r in so_far["summary"]] == ["train"]
    stopped = api.client.post(f"/v1/jobs/{job_id}/stop", headers=ALICE)
    assert stopped.status_code == 200 and stopped.json()["status"] == "STOPPED"
    RELEASE.set()
    api.client.app.state.dispatcher.shutdown(wait=True)  # let the running step end
    job = api.client.get(f"/v1/jobs/{job_id}", headers=ALICE).json()
    assert job["status"] == "STOPPED" and job["reason"] == "stopped by the user"
    assert [r["step"] for r in job["records"]] == ["train", "t_wait"]  # t_refit never ran
    report = api.client.get(f"/v1/jobs/{job_id}/report", headers=ALICE).json()
    assert report["status"] == "STOPPED"
    assert [r["step"] for r in report["summary"]] == ["train", "t_wait"]
    again = api.client.post(f"/v1/jobs/{job_id}/stop", headers=ALICE)
    assert again.status_code == 409 and again.json()["error"]["code"] == "conflict"


def test_job_from_an_uploaded_model(api, sklearn_model_bytes) -> None:
    model_id = api.upload(sklearn_model_bytes, "knn.skops").json()["id"]
    body = {"model_id": model_id, "steps": [{"name": "measure", "params": {"runs": 2}}]}
    job = api.wait_for(api.submit(body).json()["id"])
    assert job["status"] == "COMPLETED" and job["model_id"] == model_id
    (record,) = job["records"]
    assert record["input_key"] == f"users/alice/models/{model_id}/model.skops"
    assert record["metrics"]["latency_ms"]["b1"]["n"] >= 2  # runs is the minimum


def test_tenant_isolation(api, sklearn_model_bytes) -> None:
    model_id = api.upload(sklearn_model_bytes, "knn.skops").json()["id"]
    job_id = api.submit({"steps": [TRAIN]}).json()["id"]
    api.wait_for(job_id)
    for method, path in [
        ("get", f"/v1/jobs/{job_id}"),
        ("get", f"/v1/jobs/{job_id}/artifacts"),
        ("get", f"/v1/jobs/{job_id}/report"),
        ("get", f"/v1/jobs/{job_id}/report?format=html"),
        ("post", f"/v1/jobs/{job_id}/stop"),
        ("get", f"/v1/models/{model_id}"),
    ]:
        response = api.client.request(method.upper(), path, headers=BOB)
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "not_found"
    # Bob cannot run a job on Alice's model either.
    response = api.submit({"model_id": model_id, "steps": [{"name": "measure"}]}, headers=BOB)
    assert response.status_code == 404
    assert api.client.get("/v1/jobs", headers=BOB).json()["count"] == 0


def test_bad_job_specs_get_4xx_and_store_nothing(api) -> None:
    cases = [
        ({"model_id": "0" * 20, "steps": [{"name": "measure"}]}, 404, "not_found"),
        ({"steps": [{"name": "no_such_step"}]}, 422, "invalid_request"),
        ({"steps": [{"name": "train", "params": {"epochs": -1}}]}, 422, "invalid_request"),
        ({"steps": [{"name": "train", "params": {"no_such_param": 1}}]}, 422, "invalid_request"),
        ({"steps": [{"name": "measure"}]}, 422, "invalid_request"),  # no model, not train first
        ({"steps": [TRAIN], "profile": "no-such-profile"}, 422, "invalid_request"),
        ({"steps": [TRAIN], "dataset": "/etc/passwd"}, 422, "invalid_request"),
        ({"steps": [TRAIN], "user_id": "bob"}, 422, "invalid_request"),
        ({"steps": []}, 422, "invalid_request"),
        ({"steps": [TRAIN], "model_id": "../x"}, 422, "invalid_request"),
    ]
    for body, status, code in cases:
        response = api.submit(body)
        assert response.status_code == status, (body, response.text)
        assert response.json()["error"]["code"] == code, body
    assert api.client.get("/v1/jobs", headers=ALICE).json()["count"] == 0
    assert api.stored_keys() == []


@pytest.mark.parametrize("sizes", [[10**18], [0], [-5]])
def test_out_of_range_batch_sizes_are_refused_naming_the_field(api, sizes) -> None:
    measure = {"name": "measure", "params": {"batch_sizes": sizes}}
    response = api.submit({"steps": [TRAIN, measure]})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and "batch_sizes" in error["message"], error
    assert api.client.get("/v1/jobs", headers=ALICE).json()["count"] == 0


def test_job_list_pages_with_a_cursor(api) -> None:
    ids = [api.submit({"steps": [TRAIN]}).json()["id"] for _ in range(3)]
    first = api.client.get("/v1/jobs?limit=2", headers=ALICE).json()
    assert first["count"] == 2 and first["next_cursor"]
    second = api.client.get(
        "/v1/jobs", params={"limit": 2, "cursor": first["next_cursor"]}, headers=ALICE
    ).json()
    assert second["count"] == 1 and second["next_cursor"] is None
    seen = [j["id"] for j in first["data"] + second["data"]]
    assert sorted(seen) == sorted(ids) and len(set(seen)) == 3
    bad = api.client.get("/v1/jobs?cursor=not-a-cursor", headers=ALICE)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_input"
    assert api.client.get("/v1/jobs?limit=0", headers=ALICE).status_code == 422
    for job_id in ids:
        api.wait_for(job_id)
