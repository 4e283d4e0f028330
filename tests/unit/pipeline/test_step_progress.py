"""A long step's own progress reaches its job record, the event stream and the local CLI."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ConfigDict, Field

from api.routes.events import job_event
from modules.core.jobspec import parse_job_spec
from modules.core.records import JobRecord, JobStatus
from modules.core.registry import register_step, unregister_step
from modules.core.step import StepOutput, report_progress, reporting_progress
from modules.pipeline.local import LocalWorkspace


class TrialsParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    trials: int = Field(default=3, ge=1, le=10, description="Trials to report.")


@pytest.fixture
def trials_step():
    """A step that reports each of its trials and records what its job said meanwhile."""
    seen_by_step: list[object] = []

    @register_step("p_trials", params=TrialsParams, accepts={"sklearn"})
    def trials(model, data, params, ctx):
        """Report trial 1..n."""
        for i in range(1, params.trials + 1):
            report_progress({"text": f"trial {i} of {params.trials}", "trial": i})
        seen_by_step.append(ctx.job_id)
        return StepOutput(metrics={"trials": params.trials})

    yield seen_by_step
    unregister_step("p_trials")


def spec(job_id: str = "p1"):
    train = {"name": "train", "params": {"model": "logreg"}}
    return parse_job_spec({"job_id": job_id, "steps": [train, {"name": "p_trials"}]})


def test_reports_reach_the_job_record_and_an_outer_listener(tmp_path, trials_step) -> None:
    ws = LocalWorkspace(tmp_path)
    heard: list[dict] = []
    with reporting_progress(heard.append):
        result = ws.run(spec())
    assert result.status == JobStatus.COMPLETED
    # The outer listener (the local CLI's bar) hears every report ...
    assert [h["trial"] for h in heard] == [1, 2, 3]
    # ... and the job record keeps the first report the throttle let through, tagged.
    stored = ws.jobs.get("p1").step_progress
    assert stored["index"] == 1 and stored["step"] == "p_trials" and stored["trial"] == 1


def test_the_event_shows_the_running_steps_report_only_while_it_runs() -> None:
    steps = {"steps": [{"name": "train"}, {"name": "onnx_quantize"}]}
    report = {"index": 1, "step": "onnx_quantize", "text": "int8 search: trial 7 (at most 100)"}

    def job(status: str, index: int) -> JobRecord:
        return JobRecord(
            job_id="j",
            user_id="u",
            status=status,
            step_index=index,
            spec=steps,
            n_steps=2,
            step_progress=report,
        )

    running = job_event(job("INPROGRESS", 1), [])
    assert running["detail"] == "int8 search: trial 7 (at most 100)"
    assert running["step_progress"]["index"] == 1
    assert job_event(job("INPROGRESS", 0), [])["detail"] is None  # another step's report
    assert job_event(job("COMPLETED", 1), [])["detail"] is None


def test_reporting_without_a_listener_does_nothing() -> None:
    report_progress({"text": "nobody listens"})  # no error, no effect
    heard: list[dict] = []
    with reporting_progress(heard.append), reporting_progress(None):
        report_progress({"text": "x"})
    assert heard == [{"text": "x"}]
