"""Over HTTP against uvicorn, a Celery worker on Redis, and S3 + DynamoDB on a moto server."""

from __future__ import annotations

import json
import re
import select
import socket
import urllib.parse
import urllib.request
from typing import Any

import pytest

from api.auth import KeyResolver
from modules.core.registry import list_steps
from modules.pipeline.settings import load_settings

pytestmark = pytest.mark.integration

ALICE = {"X-API-Key": "dev-key-alice-0001"}
BOB = {"X-API-Key": "dev-key-bob-00002"}
FAST_TIMING = {"runs": 5, "warmup": 1}


def service_pipeline() -> list[dict[str, Any]]:
    """prune -> quantize -> measure -> ONNX parity -> report, from the steps that exist."""
    names = {step.name for step in list_steps()}
    steps: list[dict[str, Any]] = []
    if "prune_structured" in names:
        steps.append({"name": "prune_structured", "params": {"amount": 0.5, "finetune_epochs": 1}})
    onnx = "onnx_export" in names
    if onnx:
        # A torch-quantized model cannot be exported, so quantize on the ONNX side.
        steps.append({"name": "onnx_export", "params": {}})
        if "onnx_quantize" in names:
            steps.append({"name": "onnx_quantize", "params": {}})
    elif "quantize_dynamic" in names:
        steps.append({"name": "quantize_dynamic", "params": {}})
    steps.append({"name": "measure", "params": FAST_TIMING})
    if onnx and "onnx_parity" in names:
        steps.append({"name": "onnx_parity", "params": FAST_TIMING})
    if "report" in names:
        steps.append({"name": "report", "params": {}})
    return steps


def download(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        body: bytes = response.read()
    return body


def test_upload_measure_completes_over_http(service, torch_model_bytes, rows_of) -> None:
    model = service.upload(torch_model_bytes, "mlp.pt")
    assert model.status_code == 201, model.text
    model_id = model.json()["id"]
    assert service.keys(f"users/alice/models/{model_id}/") == [
        f"users/alice/models/{model_id}/meta.json",
        f"users/alice/models/{model_id}/model.pt",
    ]
    submitted = service.submit({"model_id": model_id, "steps": [{"name": "measure"}]})
    assert submitted.status_code == 202, submitted.text
    job = service.wait_for(submitted.json()["id"])
    assert job["status"] == "COMPLETED", job["reason"]
    (record,) = job["records"]
    assert record["input_key"] == f"users/alice/models/{model_id}/model.pt"
    assert record["metrics"]["latency_ms"]["b1"]["ci95"]
    (item,) = service.step_items(job["id"])
    assert item["profile"] == {"S": "edge-8mb"}
    assert int(item["output_size"]["N"]) == len(torch_model_bytes)
    assert len(rows_of(job["id"])) == 1


def test_the_compression_pipeline_over_http(service, torch_model_bytes, rows_of) -> None:
    steps = service_pipeline()
    model_id = service.upload(torch_model_bytes, "mlp.pt").json()["id"]
    submitted = service.submit({"model_id": model_id, "steps": steps, "profile": "mobile"})
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["id"]
    job = service.wait_for(job_id, timeout_s=240)
    assert job["status"] == "COMPLETED", job["reason"]
    assert job["progress"] == {
        "done": len(steps),
        "total": len(steps),
        "current": None,
        "current_step": None,
    }
    assert job["attempts"] == len(steps)

    # S3: every artifact under users/alice/, the step outputs under the job's prefix.
    prefix = f"users/alice/mobile/{job_id}/"
    keys = service.keys(prefix)
    assert f"{prefix}report.json" in keys
    for i, record in enumerate(job["records"]):
        assert record["index"] == i and record["step"] == steps[i]["name"]
        if record["output_key"] != record["input_key"]:
            assert record["output_key"] in keys
            assert record["output_key"].startswith(f"{prefix}{i:02d}-{steps[i]['name']}/")
    assert all(key.startswith("users/alice/") for key in service.keys("users/"))

    # DynamoDB: exactly one record per step, with size, profile and (measure) latency.
    items = service.step_items(job_id)
    assert [item["step"]["S"] for item in items] == [f"{i:04d}" for i in range(len(steps))]
    for item in items:
        assert item["profile"] == {"S": "mobile"} and item["user_id"] == {"S": "alice"}
        assert int(item["output_size"]["N"]) > 0
    measure = json.loads(
        next(i for i in items if i["step_name"]["S"] == "measure")["record_json"]["S"]
    )
    latency = measure["metrics"]["latency_ms"]["b1"]
    assert latency["n"] >= FAST_TIMING["runs"]  # runs is the minimum
    assert {"noisy", "target_met", "ci_half_width_rel"} <= latency.keys()
    assert latency["median_ci95"][0] <= latency["median"] <= latency["median_ci95"][1]
    assert measure["dataset"]["fingerprint"] and measure["seed"] == 0

    # CSV: the same records, one row each.
    rows = rows_of(job_id)
    assert [int(row["index"]) for row in rows] == list(range(len(steps)))
    assert {row["profile"] for row in rows} == {"mobile"}
    assert all(int(row["output_size"]) > 0 for row in rows)
    measure_row = next(row for row in rows if row["step"] == "measure")
    assert json.loads(measure_row["record_json"])["metrics"]["latency_ms"]["b1"] == latency

    # The job record in DynamoDB.
    stored = service.dynamodb().get_item(
        TableName=service.env["MCAAS_JOBS_TABLE"], Key={"job_id": {"S": job_id}}
    )["Item"]
    assert stored["status"] == {"S": "COMPLETED"} and stored["user_id"] == {"S": "alice"}

    # The report, through a presigned URL.
    artifacts = service.http.get(f"/v1/jobs/{job_id}/artifacts", headers=ALICE).json()
    report = next(a for a in artifacts["data"] if a["kind"] == "report")
    assert "Signature" in report["url"]
    downloaded = json.loads(download(report["url"]))
    assert downloaded["status"] == "COMPLETED"
    assert [row["step"] for row in downloaded["summary"]] == [s["name"] for s in steps]
    for artifact in artifacts["data"]:
        assert artifact["key"].startswith("users/alice/")
    html = service.http.get(f"/v1/jobs/{job_id}/report?format=html", headers=ALICE)
    assert html.status_code == 200 and "<html" in html.text.lower()


def test_a_goal_job_over_http_hands_back_a_gated_onnx(service, torch_model_bytes) -> None:
    """POST /v1/jobs with a goal: the Celery worker runs the compress search."""
    model_id = service.upload(torch_model_bytes).json()["id"]
    goal = {"profile": "edge-8mb", "max_drop": 50, "max_time_s": 1}
    submitted = service.submit({"model_id": model_id, "goal": goal})
    assert submitted.status_code == 202, submitted.text
    job = service.wait_for(submitted.json()["id"], timeout_s=240)
    assert job["status"] == "COMPLETED", job["reason"]
    (record,) = job["records"]
    assert record["step"] == "compress" and record["verdict"]["passed"]
    prefix = f"users/alice/edge-8mb/{job['id']}/00-compress/"
    keys = service.keys(prefix)
    assert f"{prefix}model.onnx" in keys and f"{prefix}report.html" in keys


def test_tenant_isolation_over_http(service, torch_model_bytes) -> None:
    model_id = service.upload(torch_model_bytes).json()["id"]
    job_id = service.submit({"model_id": model_id, "steps": [{"name": "measure"}]}).json()["id"]
    service.wait_for(job_id)
    for path in (
        f"/v1/models/{model_id}",
        f"/v1/jobs/{job_id}",
        f"/v1/jobs/{job_id}/artifacts",
        f"/v1/jobs/{job_id}/report",
    ):
        response = service.http.get(path, headers=BOB)
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "not_found"
    assert service.http.post(f"/v1/jobs/{job_id}/stop", headers=BOB).status_code == 404
    stolen = service.submit({"model_id": model_id, "steps": [{"name": "measure"}]}, headers=BOB)
    assert stolen.status_code == 404
    assert service.keys("users/bob/") == []


def test_bad_input_over_http_stores_nothing(service, torch_model_bytes) -> None:
    before = service.keys()
    cases = [
        (service.upload(b"", "m.pt"), 400),
        (service.upload(b"\x80\x04K\x01.", "m.pkl"), 400),
        (service.upload(b"\x80\x04K\x01.", "m.pt"), 422),
        (service.upload(torch_model_bytes[:500], "m.pt"), 422),
        (service.upload(torch_model_bytes, "../../m.pt"), 400),
        (service.submit({"model_id": "f" * 20, "steps": [{"name": "measure"}]}), 404),
        (service.submit({"steps": [{"name": "no_such_step"}]}), 422),
        (service.submit({"steps": [{"name": "train", "params": {"epochs": 0}}]}), 422),
        (service.http.get("/v1/jobs"), 401),
    ]
    for response, status in cases:
        assert response.status_code == status, response.text
        assert set(response.json()) == {"error"}
        assert "Traceback" not in response.text
    assert service.keys() == before


def _chunked_upload_until_answered(url: str, *, part: bytes, total: int) -> tuple[int, bytes]:
    """Stream a chunked multipart upload over a raw socket, stopping once the server answers.

    Returns the body bytes sent and the start of the server's answer.
    """
    parsed = urllib.parse.urlsplit(url)
    head = (
        f"POST /v1/models HTTP/1.1\r\nHost: {parsed.netloc}\r\n"
        f"X-API-Key: {ALICE['X-API-Key']}\r\n"
        "Content-Type: multipart/form-data; boundary=B\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    preamble = b'--B\r\nContent-Disposition: form-data; name="file"; filename="m.pt"\r\n\r\n'
    sent = 0
    with socket.create_connection((parsed.hostname, parsed.port), timeout=30) as sock:
        sock.sendall(head + f"{len(preamble):x}\r\n".encode() + preamble + b"\r\n")
        while sent < total:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break
            try:
                sock.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(part)
        answer = _read_answer(sock)
    return sent, answer


def _read_answer(sock: socket.socket) -> bytes:
    """The whole HTTP answer: its head and Content-Length bytes of body, which may come in
    more than one recv (or until the server closes the connection)."""
    answer = b""
    while True:
        head, sep, body = answer.partition(b"\r\n\r\n")
        if sep:
            length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            if length is not None and len(body) >= int(length.group(1)):
                return answer
        chunk = sock.recv(65536)
        if not chunk:
            return answer
        answer += chunk


def test_upload_cap_is_enforced_while_streaming(service) -> None:
    before = service.keys("users/alice/models/")
    limit = int(float(service.env["MCAAS_MAX_UPLOAD_MB"]) * 1024 * 1024)
    total = 20 * limit
    sent, answer = _chunked_upload_until_answered(
        service.stack.api_url, part=b"\0" * (64 * 1024), total=total
    )
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"too_large"' in answer
    # No Content-Length was sent: the server counted, and answered before the body ended
    # (the body is 20x the cap; how early depends on load, so only "before the end").
    assert sent < total
    assert service.keys("users/alice/models/") == before


def test_api_keys_from_the_dynamodb_table(service) -> None:
    settings = load_settings(api_keys_table=service.env["MCAAS_API_KEYS_TABLE"])
    KeyResolver(settings).add_key("carol-table-key-1", "carol")
    response = service.http.get("/v1/jobs", headers={"X-API-Key": "carol-table-key-1"})
    assert response.status_code == 200 and response.json()["count"] == 0
    assert (
        service.http.get("/v1/jobs", headers={"X-API-Key": "carol-table-key-2"}).status_code == 401
    )


def test_readiness_checks_every_backend(service) -> None:
    ready = service.http.get("/readyz").json()
    assert ready == {"status": "ready", "checks": {"s3": "ok", "dynamodb": "ok", "redis": "ok"}}
