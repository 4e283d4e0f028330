"""The dashboard on the embedded stack: login, redirects, CSRF, escaping, pages, plots, SSE."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from api.main import create_app
from api.routes.events import step_states
from api.ui.session import COOKIE_NAME, Session, decode_session, encode_session
from modules.core.records import JobRecord, StepRecord
from tests.unit.api.conftest import ALICE, BOB, SECRET, TERMINAL, make_settings

EVIL_NAME = "<img src=x onerror=alert(1)>.pt"


def login(client: TestClient, key: str = ALICE["X-API-Key"]) -> str:
    """Log in; return the CSRF token of the session."""
    response = client.post("/ui/login", data={"api_key": key, "next": "/ui/upload"})
    assert response.status_code == 303, response.text
    page = client.get("/ui/upload")
    assert page.status_code == 200
    match = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert match is not None
    return match.group(1)


def wait_for(client: TestClient, job_id: str) -> dict[str, Any]:
    import time

    deadline = time.monotonic() + 60
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}", headers=ALICE).json()
        if job["status"] in TERMINAL:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish: {job}")


def upload(
    client: TestClient, csrf: str, data: bytes, *, name: str = EVIL_NAME, **fields: str
) -> Any:
    form = {"csrf": csrf, "profile": "edge-8mb", "preset": "measure", "dataset": "digits"}
    form.update(fields)
    return client.post("/ui/upload", data=form, files={"file": (name, data)})


def sse_events(text: str) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for frame in text.split("\n\n"):
        lines = dict(line.split(": ", 1) for line in frame.splitlines() if ": " in line)
        if "event" in lines:
            events.append((lines["event"], json.loads(lines["data"])))
    return events


def test_pages_redirect_to_the_login_form_with_where_you_were_going(ui) -> None:
    for path in ("/ui/jobs", "/ui/upload", "/ui/jobs/abc"):
        response = ui.get(path)
        assert response.status_code == 303
        assert response.headers["location"] == f"/ui/login?next={path}"
    assert ui.get("/ui").headers["location"] == "/ui/jobs"
    form = ui.get("/ui/login?next=/ui/upload")
    assert form.status_code == 200
    assert 'name="next" value="/ui/upload"' in form.text


def test_login_sets_a_signed_httponly_lax_cookie_and_rejects_bad_keys(ui) -> None:
    bad = ui.post("/ui/login", data={"api_key": "not-a-key-at-all", "next": "/ui/jobs"})
    assert bad.status_code == 401
    assert "not valid" in bad.text
    assert COOKIE_NAME not in bad.cookies
    good = ui.post("/ui/login", data={"api_key": ALICE["X-API-Key"], "next": "//evil.example/x"})
    assert good.status_code == 303
    assert good.headers["location"] == "/ui/jobs"  # no open redirect
    cookie = good.headers["set-cookie"]
    assert "HttpOnly" in cookie
    assert "SameSite=lax" in cookie or "samesite=lax" in cookie.lower()
    assert ALICE["X-API-Key"] not in cookie
    page = ui.get("/ui/jobs")
    assert page.status_code == 200
    assert "alice" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]


def test_forged_tampered_and_expired_sessions_are_refused(ui) -> None:
    secret = SECRET.encode()
    forged = encode_session(Session("alice", "t", 2**40), secret=b"x" * 40)
    ui.cookies.set(COOKIE_NAME, forged)
    assert ui.get("/ui/jobs").status_code == 303
    good = encode_session(Session("alice", "t", 2**40), secret=secret)
    signature = good.split(".")[1]
    bob_payload = encode_session(Session("bob", "t", 2**40), secret=secret).split(".")[0]
    ui.cookies.set(COOKIE_NAME, f"{bob_payload}.{signature}")
    assert ui.get("/ui/jobs").status_code == 303
    assert decode_session(good, secret=secret) == Session("alice", "t", 2**40)
    expired = encode_session(Session("alice", "t", 100), secret=secret)
    assert decode_session(expired, secret=secret, now=101) is None
    assert decode_session("garbage", secret=secret) is None


def test_the_dashboard_is_off_without_a_session_secret_outside_dev_mode(tmp_path) -> None:
    with TestClient(create_app(make_settings(tmp_path)), follow_redirects=False) as client:
        form = client.get("/ui/login")
        assert form.status_code == 503
        assert "MCAAS_SESSION_SECRET" in form.text
        refused = client.post("/ui/login", data={"api_key": ALICE["X-API-Key"]})
        assert refused.status_code == 503
        assert COOKIE_NAME not in refused.cookies


def test_upload_starts_a_job_and_every_page_escapes_the_model_name(ui, torch_model_bytes) -> None:
    csrf = login(ui)
    started = upload(ui, csrf, torch_model_bytes)
    assert started.status_code == 303, started.text
    job_id = started.headers["location"].rsplit("/", 1)[-1]
    job = wait_for(ui, job_id)
    assert job["status"] == "COMPLETED", job["reason"]
    assert [s["name"] for s in job["steps"]] == ["measure", "report"]

    escaped = "&lt;img src=x onerror=alert(1)&gt;.pt"
    for path in ("/ui/jobs", f"/ui/jobs/{job_id}", "/ui/upload"):
        text = ui.get(path).text
        assert escaped in text, path
        assert "<img src=x" not in text, path

    page = ui.get(f"/ui/jobs/{job_id}").text
    assert page.count('<li data-index="') == 2
    table = page.split('id="steps"', 1)[1].split("</table>", 1)[0]
    assert table.count("<tr>") == 1 + 2  # header + one row per step
    assert 'value="100"' in page  # the progress bar of a finished job
    for name in ("pareto", "waterfall", "sparsity"):
        assert f"/plots/{name}.png" in page
        png = ui.get(f"/ui/jobs/{job_id}/plots/{name}.png")
        assert png.status_code == 200
        assert png.content.startswith(b"\x89PNG")
    assert ui.get(f"/ui/jobs/{job_id}/plots/nope.png").status_code == 404

    report = ui.get(f"/ui/jobs/{job_id}/report")
    assert report.status_code == 200
    assert "default-src 'none'" in report.headers["content-security-policy"]
    keys = re.findall(r'/files\?key=([^"]+)"', page)
    assert any(k.endswith("report.html") for k in keys)
    download = ui.get(f"/ui/jobs/{job_id}/files", params={"key": keys[0].replace("%2F", "/")})
    assert download.status_code == 200
    assert download.headers["content-disposition"].startswith("attachment")
    foreign = ui.get(f"/ui/jobs/{job_id}/files", params={"key": "users/bob/models/x/model.pt"})
    assert foreign.status_code == 404


def test_another_users_job_is_not_found_in_the_dashboard(ui, torch_model_bytes) -> None:
    csrf = login(ui)
    job_id = upload(ui, csrf, torch_model_bytes).headers["location"].rsplit("/", 1)[-1]
    wait_for(ui, job_id)
    ui.cookies.clear()
    login(ui, BOB["X-API-Key"])
    assert ui.get(f"/ui/jobs/{job_id}").status_code == 404
    assert ui.get(f"/ui/jobs/{job_id}/plots/waterfall.png").status_code == 404
    assert ui.get(f"/v1/jobs/{job_id}/events").status_code == 404
    assert job_id not in ui.get("/ui/jobs").text


def test_forms_without_the_csrf_token_or_with_a_bad_preset_store_nothing(
    ui, ui_settings, sklearn_model_bytes
) -> None:
    csrf = login(ui)
    no_token = upload(ui, "wrong", sklearn_model_bytes, name="knn.skops")
    assert no_token.status_code == 400
    assert "out of date" in no_token.text
    mismatch = upload(ui, csrf, sklearn_model_bytes, name="knn.skops", preset="quick-prune")
    assert mismatch.status_code == 400
    assert "takes torch models, not sklearn" in mismatch.text
    unknown = upload(ui, csrf, sklearn_model_bytes, name="knn.skops", profile="no-such-profile")
    assert unknown.status_code == 400
    assert not list(Path(str(ui_settings.store_url)).rglob("meta.json"))
    logout = ui.post("/ui/logout", data={"csrf": "wrong"})
    assert logout.status_code == 400
    assert ui.post("/ui/logout", data={"csrf": csrf}).status_code == 303
    assert ui.get("/ui/jobs").status_code == 303


def test_events_stream_the_job_state_by_header_or_cookie(ui, torch_model_bytes) -> None:
    csrf = login(ui)
    job_id = upload(ui, csrf, torch_model_bytes, name="m.pt").headers["location"].rsplit("/")[-1]
    wait_for(ui, job_id)
    with ui.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        body = response.read().decode()
    ((kind, event),) = sse_events(body)
    assert kind == "end"
    assert event["status"] == "COMPLETED"
    assert (event["percent"], event["done"], event["total"]) == (100, 2, 2)
    assert [s["state"] for s in event["steps"]] == ["done", "done"]
    ui.cookies.clear()
    assert ui.get(f"/v1/jobs/{job_id}/events").status_code == 401
    by_key = ui.get(f"/v1/jobs/{job_id}/events", headers=ALICE)
    assert sse_events(by_key.text)[0][1]["status"] == "COMPLETED"
    assert ui.get(f"/v1/jobs/{job_id}/events", headers=BOB).status_code == 404


def test_step_states_follow_the_job() -> None:
    spec = {"steps": [{"name": "measure"}, {"name": "onnx_parity"}, {"name": "report"}]}

    def job(status: str, step_index: int) -> JobRecord:
        return JobRecord(
            job_id="j", user_id="u", status=status, step_index=step_index, spec=spec, n_steps=3
        )

    running = job("INPROGRESS", 1)
    records = [StepRecord(job_id="j", index=0, step="measure", verdict=None)]
    assert [s["state"] for s in step_states(running, records)] == ["done", "running", "pending"]
    rejected = job("REJECTED", 1)
    records = [
        StepRecord(job_id="j", index=0, step="measure"),
        StepRecord(job_id="j", index=1, step="onnx_parity", verdict={"passed": False}),
    ]
    assert [s["state"] for s in step_states(rejected, records)] == ["done", "rejected", "skipped"]
    failed = job("FAILED", 0)
    assert [s["state"] for s in step_states(failed, [])] == ["failed", "skipped", "skipped"]


def test_the_upload_form_takes_a_pt2_and_a_bare_state_dict_with_its_arch(ui) -> None:
    import io

    import torch

    from modules.storage.architectures import build_model
    from tests.corpus.make_corpus import pt2_bytes

    csrf = login(ui)
    page = ui.get("/ui/upload").text
    assert 'name="arch"' in page and ".pt2" in page
    for name, data, fields in (
        ("resmlp.pt2", pt2_bytes(), {}),
        ("sd.pt", None, {"arch": '{"name": "mlp", "in_features": 64, "hidden": [16], '
                                 '"num_classes": 10}'}),
    ):  # fmt: skip
        if data is None:
            buffer = io.BytesIO()
            arch = {"name": "mlp", "in_features": 64, "hidden": [16], "num_classes": 10}
            torch.save(build_model(arch).state_dict(), buffer)
            data = buffer.getvalue()
        started = upload(ui, csrf, data, name=name, **fields)
        assert started.status_code == 303, started.text
        job = wait_for(ui, started.headers["location"].rsplit("/", 1)[-1])
        assert job["status"] == "COMPLETED", (name, job["reason"])
    refused = upload(ui, csrf, data, name="sd.pt")  # the same state dict, no arch
    assert refused.status_code == 422
    assert "bare state_dict" in refused.text


def test_the_compress_to_budget_choice_starts_a_compress_job(
    ui, torch_model_bytes, monkeypatch
) -> None:
    from dataclasses import replace

    from modules.pipeline import presets

    real = presets.PRESETS["compress-to-budget"]
    assert real.step_calls() == [{"name": "compress", "params": {"max_drop": 1.0}}]
    # The same choice with a one-second search, so the job ends inside the test.
    quick = replace(real, steps=(("compress", {"max_drop": 50, "max_time_s": 1}),))
    monkeypatch.setitem(presets.PRESETS, "compress-to-budget", quick)
    csrf = login(ui)
    assert "compress-to-budget" in ui.get("/ui/upload").text
    started = upload(ui, csrf, torch_model_bytes, name="mlp.pt", preset="compress-to-budget")
    assert started.status_code == 303, started.text
    job_id = started.headers["location"].rsplit("/", 1)[-1]
    job = wait_for(ui, job_id)
    assert job["status"] == "COMPLETED", job["reason"]
    assert [s["name"] for s in job["steps"]] == ["compress"]
    assert job["records"][0]["output_key"].endswith("model.onnx")
