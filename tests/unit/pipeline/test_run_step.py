import pytest
from pydantic import BaseModel, ConfigDict, Field
from sklearn.linear_model import LogisticRegression

from modules.core.artifact import ModelArtifact
from modules.core.jobspec import parse_job_spec
from modules.core.registry import register_step, unregister_step
from modules.core.step import StepCancelled, StepOutput, Verdict, check_cancelled
from modules.errors import IncompatibleError
from modules.pipeline.local import LocalWorkspace, run_single_step
from modules.pipeline.run import PipelineOrderError, run_step

CALLS: list[str] = []


class GateParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    threshold: float = Field(default=0.5, ge=0, le=1, description="Min accuracy.")


@pytest.fixture(autouse=True)
def toy_steps():
    @register_step("t_refit", params=GateParams, accepts={"sklearn"})
    def refit(model, data, params, ctx):
        """Refit a logistic regression (counts its calls)."""
        CALLS.append(ctx.step_name)
        est = LogisticRegression(max_iter=50).fit(data.X_train, data.y_train)
        return StepOutput(
            model=ModelArtifact("sklearn", est), metrics={"n": 1}, files={"note.txt": b"hello"}
        )

    @register_step("t_gate", params=GateParams, accepts={"sklearn"}, gate=True)
    def gate(model, data, params, ctx):
        """Pass when accuracy >= threshold."""
        acc = float(model.obj.score(data.X_test, data.y_test))
        ok = acc >= params.threshold
        return StepOutput(verdict=Verdict(ok, f"accuracy {acc:.3f} vs floor {params.threshold}"))

    CALLS.clear()
    yield
    unregister_step("t_refit")
    unregister_step("t_gate")


def job(**over):
    base = {
        "job_id": "j1",
        "steps": [
            {"name": "train", "params": {"model": "logreg"}},
            {"name": "t_refit"},
            {"name": "t_gate", "params": {"threshold": 0.5}},
        ],
    }
    base.update(over)
    return parse_job_spec(base)


def test_pipeline_writes_artifacts_and_records(tmp_path):
    ws = LocalWorkspace(tmp_path)
    result = ws.run(job())
    assert result.status == "COMPLETED"
    records = ws.log.records("j1")
    assert [r.index for r in records] == [0, 1, 2]
    train, refit, gate = records
    assert train.output_key == "users/local/edge-8mb/j1/00-train/model.skops"
    assert refit.input_key == train.output_key
    assert refit.files["note.txt"].endswith("01-t_refit/note.txt")
    assert ws.store.get_bytes(refit.files["note.txt"]) == b"hello"
    # A gate passes its input through.
    assert gate.output_key == refit.output_key and gate.verdict["passed"] is True
    for r in records:
        assert r.dataset["fingerprint"] == train.dataset["fingerprint"]
        assert r.versions["scikit-learn"] and r.profile == "edge-8mb" and r.seed == 0
    assert ws.jobs.get("j1").status == "COMPLETED"


def test_rerun_is_idempotent(tmp_path):
    ws = LocalWorkspace(tmp_path)
    spec = job()
    ws.run(spec)
    keys_before = ws.store.list("users/local/")
    first = run_step(spec, 1, store=ws.store, log=ws.log)
    ws.run(spec)
    assert CALLS == ["t_refit"]  # the step body ran once
    assert run_step(spec, 1, store=ws.store, log=ws.log) == first
    assert len(ws.log.records("j1")) == 3
    assert ws.store.list("users/local/") == keys_before


def test_failed_gate_rejects_and_stops(tmp_path):
    ws = LocalWorkspace(tmp_path)
    spec = job(
        steps=[
            {"name": "train", "params": {"model": "logreg"}},
            {"name": "t_gate", "params": {"threshold": 1.0}},
            {"name": "t_refit"},
        ]
    )
    result = ws.run(spec)
    assert result.status == "REJECTED"
    assert "accuracy" in result.reason and "floor 1.0" in result.reason
    assert CALLS == []
    stored = ws.jobs.get("j1")
    assert stored.status == "REJECTED" and "floor 1.0" in stored.reason
    with pytest.raises(PipelineOrderError, match="rejected"):
        run_step(spec, 2, store=ws.store, log=ws.log)


def test_out_of_order_step_is_refused(tmp_path):
    ws = LocalWorkspace(tmp_path)
    with pytest.raises(PipelineOrderError, match="has not run"):
        run_step(job(), 2, store=ws.store, log=ws.log)


def test_wrong_framework_fails_job_with_reason(tmp_path):
    ws = LocalWorkspace(tmp_path)
    spec = job(
        steps=[{"name": "train", "params": {"model": "mlp", "epochs": 1}}, {"name": "t_refit"}]
    )
    result = ws.run(spec)
    assert result.status == "FAILED"
    assert "accepts ['sklearn'] models, got 'torch'" in result.reason
    with pytest.raises(IncompatibleError):
        run_step(spec, 1, store=ws.store, log=ws.log)


def test_single_step_cli_runner_writes_only_on_success(tmp_path):
    out = tmp_path / "model.skops"
    record = run_single_step("train", {"model": "knn"}, input_path=None, output_path=out)
    assert out.stat().st_size == record.output_size
    bad = tmp_path / "model.pt"
    with pytest.raises(Exception, match="saved as"):
        run_single_step("train", {"model": "knn"}, input_path=None, output_path=bad)
    assert not bad.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.skops"]


def test_a_file_named_like_the_model_is_refused(tmp_path):
    @register_step("t_clash", params=GateParams, accepts={"sklearn"})
    def clash(model, data, params, ctx):
        """Return a model and a file with the model's name."""
        return StepOutput(model=model, files={"model.skops": b"not a model"})

    try:
        ws = LocalWorkspace(tmp_path)
        spec = job(steps=[{"name": "train", "params": {"model": "logreg"}}, {"name": "t_clash"}])
        result = ws.run(spec)
        assert result.status == "FAILED"
        assert "named like its model" in (result.reason or "")
        assert ws.store.list("users/local/edge-8mb/j1/01-t_clash/") == []
    finally:
        unregister_step("t_clash")


def test_many_files_are_all_stored(tmp_path):
    @register_step("t_files", params=GateParams, accepts={"sklearn"})
    def files(model, data, params, ctx):
        """Return twelve small files."""
        return StepOutput(files={f"f{i:02d}.txt": str(i).encode() for i in range(12)})

    try:
        ws = LocalWorkspace(tmp_path)
        spec = job(steps=[{"name": "train", "params": {"model": "logreg"}}, {"name": "t_files"}])
        assert ws.run(spec).status == "COMPLETED"
        record = ws.log.get("j1", 1)
        assert len(record.files) == 12
        for i in range(12):
            assert ws.store.get_bytes(record.files[f"f{i:02d}.txt"]) == str(i).encode()
    finally:
        unregister_step("t_files")


class Guard:
    """run_step's hook: confirm() after the body, cancelled() between its rounds."""

    def __init__(self, confirm=None, cancelled=None):
        self._confirm = confirm or (lambda: None)
        self._cancelled = cancelled or (lambda: False)

    def confirm(self):
        self._confirm()

    def cancelled(self):
        return self._cancelled()


def test_the_guard_confirms_after_the_body_and_can_keep_the_step_unstored(tmp_path):
    ws = LocalWorkspace(tmp_path)
    spec = job()
    run_step(spec, 0, store=ws.store, log=ws.log)

    def refuse():
        assert CALLS == ["t_refit"]  # after the body
        raise RuntimeError("not begun")

    with pytest.raises(RuntimeError, match="not begun"):
        run_step(spec, 1, store=ws.store, log=ws.log, guard=Guard(refuse))
    assert ws.log.get("j1", 1) is None
    assert ws.store.list("users/local/edge-8mb/j1/01-t_refit/") == []
    seen = []
    record = run_step(spec, 1, store=ws.store, log=ws.log, guard=Guard(lambda: seen.append(1)))
    assert seen == [1] and ws.log.get("j1", 1) == record
    # A step that already ran returns its record without calling it.
    assert run_step(spec, 1, store=ws.store, log=ws.log, guard=Guard(refuse)) == record


def test_a_cancelled_training_step_stops_at_its_next_epoch(tmp_path):
    ws = LocalWorkspace(tmp_path)
    spec = job(steps=[{"name": "train", "params": {"model": "mlp", "epochs": 500}}])
    asked = []

    def cancelled():
        asked.append(1)
        return len(asked) > 2  # wanted for two epochs, then no longer

    with pytest.raises(StepCancelled):
        run_step(spec, 0, store=ws.store, log=ws.log, guard=Guard(cancelled=cancelled))
    assert len(asked) == 3  # checked once per epoch; 497 epochs never ran
    assert ws.log.get("j1", 0) is None
    check_cancelled()  # outside a cancellable step it never raises
