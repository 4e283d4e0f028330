"""The in-process runner is the engine's loop: the same statuses, one report at one key."""

from __future__ import annotations

import json

import pytest
from pydantic import BaseModel, ConfigDict, Field

from modules.core.jobspec import parse_job_spec
from modules.core.records import JobRecord, JobStatus, StepRecord
from modules.core.registry import register_step, unregister_step
from modules.core.step import StepOutput, Verdict
from modules.errors import BadInputError
from modules.pipeline.engine import report_key
from modules.pipeline.local import LocalWorkspace


class GateParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    passed: bool = Field(default=True, description="The verdict to give.")
    explode: bool = Field(default=False, description="Raise bad input instead.")


@pytest.fixture(autouse=True)
def toy_gate():
    @register_step("r_gate", params=GateParams, accepts={"sklearn"}, gate=True)
    def gate(model, data, params, ctx):
        """Pass or fail as told."""
        if params.explode:
            raise BadInputError("told to explode")
        return StepOutput(verdict=Verdict(params.passed, f"told to pass={params.passed}"))

    yield
    unregister_step("r_gate")


def spec(*steps, job_id="r1"):
    train = {"name": "train", "params": {"model": "logreg"}}
    return parse_job_spec({"job_id": job_id, "steps": [train, *steps]})


def stored_report(ws, result):
    assert result.report_key == report_key(JobRecord.new(spec(job_id=result.job_id)))
    return json.loads(ws.store.get_bytes(result.report_key))


def test_completed_job_has_its_one_report_beside_its_steps(tmp_path) -> None:
    ws = LocalWorkspace(tmp_path)
    seen = []
    result = ws.run(spec({"name": "r_gate"}), progress=lambda i, n, r: seen.append((i, n)))
    assert result.status == JobStatus.COMPLETED and result.reason is None
    assert seen == [(1, 2), (2, 2)]
    assert result.report_key == "users/local/edge-8mb/r1/report.json"
    report = stored_report(ws, result)
    assert report["status"] == "COMPLETED"
    assert [row["step"] for row in report["summary"]] == ["train", "r_gate"]
    assert ws.jobs.get("r1").status == "COMPLETED"


def test_a_failed_gate_rejects(tmp_path) -> None:
    ws = LocalWorkspace(tmp_path)
    result = ws.run(spec({"name": "r_gate", "params": {"passed": False}}, {"name": "measure"}))
    assert result.status == JobStatus.REJECTED
    assert result.reason == "step 1 (r_gate) rejected: told to pass=False"
    assert StepRecord.of(result.records[-1]).rejection_reason == result.reason
    assert len(result.records) == 2
    assert stored_report(ws, result)["status"] == "REJECTED"


def test_bad_input_fails_the_job_and_a_rerun_starts_over(tmp_path) -> None:
    ws = LocalWorkspace(tmp_path)
    result = ws.run(spec({"name": "r_gate", "params": {"explode": True}}))
    assert result.status == JobStatus.FAILED and isinstance(result.error, BadInputError)
    assert result.reason == "step 1 (r_gate) failed: told to explode"
    assert stored_report(ws, result)["status"] == "FAILED"
    # The same job id, fixed: it runs again, reusing step 0's stored record.
    again = ws.run(spec({"name": "r_gate"}))
    assert again.status == JobStatus.COMPLETED and again.error is None
    assert [r.index for r in again.records] == [0, 1]
    assert ws.jobs.get("r1").attempts == 4  # 0, 1 (failed), then 0 (its record), 1
