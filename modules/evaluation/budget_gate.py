"""The `budget_gate` step: reject a model that cannot fit the profile or falls below a floor.

Checks, each reported with its numbers whether it passes or not:
* memory: predicted batch-1 inference memory (model + activations, the hardware_sim
  memory curve M(1)) <= the profile's memory budget;
* flash: serialized size <= the profile's flash, when the profile sets one;
* latency: estimated batch-1 median latency (measured / compute_scale) <= the profile's
  latency budget, when it sets one;
* accuracy: test accuracy >= accuracy_floor, when given.
Any failed check fails the gate, and the job ends REJECTED with the reason.
"""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, Field

from modules.core.artifact import ModelArtifact
from modules.core.registry import register_step
from modules.core.step import StepContext, StepOutput, Verdict
from modules.evaluation.hardware_sim import MIB, HardwareProbe, evaluate_budget, noisy_note
from modules.evaluation.measure import TimingFields
from modules.storage.datasets import Dataset


class BudgetGateParams(TimingFields):
    """Params of the `budget_gate` step; unset budgets come from the job's profile."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    accuracy_floor: float | None = Field(
        default=None, ge=0, le=1, description="Minimum test accuracy (0..1); none = no floor."
    )
    check_memory: bool = Field(default=True, description="Check batch-1 memory vs the budget.")
    check_flash: bool = Field(default=True, description="Check the file size vs the flash size.")
    check_latency: bool = Field(default=True, description="Check latency vs the latency budget.")
    memory_budget_mb: float | None = Field(
        default=None, gt=0, le=1_048_576, description="Override the profile's memory budget (MB)."
    )
    compute_scale: float | None = Field(
        default=None, gt=0, le=100, description="Override the profile's compute scale."
    )
    latency_budget_ms: float | None = Field(
        default=None, gt=0, le=3_600_000, description="Override the profile's latency budget."
    )


def budget_checks(
    evaluation: dict[str, Any],
    *,
    accuracy: float,
    params: BudgetGateParams,
) -> tuple[list[str], list[str]]:
    """(failed, passed) check descriptions, each stating its numbers."""
    failed: list[str] = []
    passed: list[str] = []
    if params.check_memory:
        need = float(evaluation["batch1_predicted_bytes"])
        budget = float(evaluation["memory_budget_bytes"])
        text = (
            f"batch-1 memory {need / MIB:.3f} MB (model {evaluation['model_bytes'] / MIB:.3f} MB "
            f"+ activations) {'<=' if need <= budget else '>'} budget {budget / MIB:.3f} MB"
        )
        (passed if need <= budget else failed).append(text)
    flash_mb = evaluation.get("flash_mb")
    if params.check_flash and flash_mb is not None:
        size = int(evaluation["serialized_bytes"])
        ok = size <= flash_mb * MIB
        text = f"file {size / MIB:.3f} MB {'<=' if ok else '>'} flash {flash_mb:g} MB"
        (passed if ok else failed).append(text)
    limit = evaluation.get("latency_budget_ms")
    if params.check_latency and limit is not None:
        b1 = evaluation["estimated_latency_ms"]["b1"]
        est = float(b1["median"])
        ok = est <= limit
        text = (
            f"estimated batch-1 latency {est:.3f} ms (measured / compute scale "
            f"{evaluation['compute_scale']:g}) {'<=' if ok else '>'} budget {limit:g} ms"
            + noisy_note(b1)
        )
        (passed if ok else failed).append(text)
    if params.accuracy_floor is not None:
        ok = accuracy >= params.accuracy_floor
        text = f"accuracy {accuracy:.4f} {'>=' if ok else '<'} floor {params.accuracy_floor:.4f}"
        (passed if ok else failed).append(text)
    return failed, passed


@register_step(
    "budget_gate", params=BudgetGateParams, accepts={"torch", "sklearn", "onnx"}, gate=True
)
def budget_gate(
    model: ModelArtifact, data: Dataset, params: BudgetGateParams, ctx: StepContext
) -> StepOutput:
    """Reject when the model misses the profile's memory, flash or latency budget or accuracy."""
    profile = ctx.profile
    probe = HardwareProbe(
        model,
        data,
        memory_batch_sizes=(1, 8),
        warmup=params.warmup,
        runs=params.runs,
        ci_target=params.ci_target,
        max_time_s=params.max_time_s,
    )
    evaluation = evaluate_budget(
        probe,
        memory_budget_mb=params.memory_budget_mb or profile.memory_budget_mb,
        compute_scale=params.compute_scale or profile.compute_scale,
        power_w=profile.power_w,
        flash_mb=profile.flash_mb,
        latency_budget_ms=params.latency_budget_ms or profile.latency_budget_ms,
        max_batch=1,
    )
    accuracy = float((probe.predictor.labels(data.X_test) == data.y_test).mean())
    failed, passed = budget_checks(evaluation, accuracy=accuracy, params=params)
    if failed:
        reason = f"over budget on profile {profile.name}: " + "; ".join(failed)
        if passed:
            reason += " (passed: " + "; ".join(passed) + ")"
    elif passed:
        reason = f"within budget on profile {profile.name}: " + "; ".join(passed)
    else:
        reason = "no check applies: every check is off and no accuracy floor is set"
    metrics = {
        "accuracy": accuracy,
        "checks_failed": failed,
        "checks_passed": passed,
        "batch1_predicted_bytes": evaluation["batch1_predicted_bytes"],
        "memory_budget_bytes": evaluation["memory_budget_bytes"],
        "serialized_bytes": evaluation["serialized_bytes"],
        "estimated_latency_ms": evaluation["estimated_latency_ms"],
        "energy_mj_per_inference_estimate": evaluation["energy_mj_per_inference_estimate"],
    }
    return StepOutput(model=None, metrics=metrics, verdict=Verdict(not failed, reason))
