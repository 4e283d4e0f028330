import pytest
from pydantic import ValidationError

from modules.core.jobspec import parse_job_spec
from modules.evaluation.budget_gate import BudgetGateParams, budget_gate
from modules.pipeline.local import LocalWorkspace

FAST = {"runs": 3, "warmup": 1}


def test_passes_within_budget_and_states_the_numbers(small_mlp, digits, ctx_factory):
    ctx = ctx_factory(profile={"memory_budget_mb": 8, "compute_scale": 1, "power_w": 1})
    out = budget_gate(small_mlp, digits, BudgetGateParams(accuracy_floor=0.5, **FAST), ctx)
    assert out.verdict.passed
    assert "within budget" in out.verdict.reason
    assert "<= budget 8.000 MB" in out.verdict.reason and ">= floor 0.5000" in out.verdict.reason


def test_rejects_memory_flash_and_accuracy_with_numbers(small_mlp, digits, ctx_factory):
    tiny = {"memory_budget_mb": 0.001, "flash_mb": 0.001, "compute_scale": 1, "power_w": 1}
    params = BudgetGateParams(accuracy_floor=1.0, **FAST)
    out = budget_gate(small_mlp, digits, params, ctx_factory(profile=tiny))
    reason = out.verdict.reason
    assert not out.verdict.passed
    assert reason.startswith("over budget on profile custom")
    assert "> budget 0.001 MB" in reason  # memory, with the numbers
    assert "> flash 0.001 MB" in reason
    assert "< floor 1.0000" in reason
    assert len(out.metrics["checks_failed"]) == 3


def test_latency_budget_uses_the_compute_scale(small_mlp, digits, ctx_factory):
    # A target a million times slower than this CPU cannot meet a 1 ms budget.
    slow = {"memory_budget_mb": 8, "compute_scale": 1e-6, "power_w": 1, "latency_budget_ms": 1}
    params = BudgetGateParams(check_memory=False, **FAST)
    out = budget_gate(small_mlp, digits, params, ctx_factory(profile=slow))
    assert not out.verdict.passed
    reason = out.verdict.reason
    assert "estimated batch-1 latency" in reason and "> budget 1 ms" in reason


def test_failed_gate_ends_the_job_rejected(tmp_path):
    spec = parse_job_spec(
        {
            "job_id": "gate1",
            "profile": {"memory_budget_mb": 0.001, "compute_scale": 1, "power_w": 1},
            "steps": [
                {"name": "train", "params": {"model": "knn"}},
                {"name": "budget_gate", "params": FAST},
                {"name": "measure", "params": {}},
            ],
        }
    )
    result = LocalWorkspace(tmp_path).run(spec)
    assert result.status == "REJECTED"
    assert "budget_gate" in result.reason and "MB" in result.reason
    assert len(result.records) == 2  # measure never ran


@pytest.mark.parametrize("field", ["memory_budget_mb", "compute_scale", "latency_budget_ms"])
def test_zero_or_negative_budget_is_refused_by_name(field):
    for bad in (0, -1):
        with pytest.raises(ValidationError, match=field):
            BudgetGateParams(**{field: bad})
    with pytest.raises(ValidationError, match="accuracy_floor"):
        BudgetGateParams(accuracy_floor=1.5)
