"""`mcaas submit --follow` against uvicorn + a Celery worker: the same SSE events as the page."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from modules.cli import app, sse_frames

pytestmark = pytest.mark.integration

ALICE_KEY = "dev-key-alice-0001"


def submit(service, *args: str, key: str = ALICE_KEY):
    return CliRunner().invoke(
        app, ["submit", *args, "--api-url", service.stack.api_url, "--api-key", key]
    )


def text(result) -> str:
    """The output with rich's line wrapping undone."""
    return " ".join(result.output.split())


def test_submit_follow_shows_progress_and_exits_0_on_completion(
    service, torch_model_bytes, tmp_path: Path
) -> None:
    model = tmp_path / "mlp.pt"
    model.write_bytes(torch_model_bytes)
    result = submit(service, str(model), "--preset", "measure", "--follow")
    assert result.exit_code == 0, result.output
    assert "2/2 steps" in text(result)
    assert "COMPLETED" in text(result)
    assert "measure" in text(result)


def test_submit_follow_exits_1_with_the_reason_when_a_gate_rejects(
    service, torch_model_bytes, tmp_path: Path
) -> None:
    model = tmp_path / "mlp.pt"
    model.write_bytes(torch_model_bytes)
    job = tmp_path / "job.yaml"
    steps = [{"name": "budget_gate", "params": {"accuracy_floor": 1.0, "runs": 3, "warmup": 1}}]
    job.write_text(json.dumps({"steps": steps}))
    result = submit(service, str(model), "--job", str(job), "--follow")
    assert result.exit_code == 1, result.output
    assert "REJECTED" in text(result)
    assert "accuracy" in text(result)


def test_submit_refuses_bad_input_with_exit_2(service, tmp_path: Path) -> None:
    result = submit(service, str(tmp_path / "missing.pt"), "--preset", "measure")
    assert result.exit_code == 2
    assert "does not exist" in text(result)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    result = submit(service, str(junk), "--preset", "measure")
    assert result.exit_code == 2
    assert "POST /v1/models answered 422" in text(result)
    result = submit(service, str(junk), "--preset", "measure", key="wrong-key-123")
    assert result.exit_code == 2
    assert "401" in text(result)


def test_sse_frames_parse_events_and_skip_comments() -> None:
    lines = [
        "retry: 2000",
        "",
        ": keep-alive",
        "",
        "event: progress",
        'data: {"done": 1}',
        "",
        "event: end",
        'data: {"done": 2}',
        "",
    ]
    assert list(sse_frames(lines)) == [("progress", {"done": 1}), ("end", {"done": 2})]
