"""Hardware-budget simulation: latency, memory, auto-batch and energy on a target profile.

A profile names a memory budget (MB), an optional flash size (MB), a compute scale
(target speed / speed of the machine that measures) and an active power draw (W).
1 MB here is 2**20 bytes, so `memory_budget_mb: 0.25` is 256 KB. The formulas:

* Estimated latency:  t_target(b) = t_measured(b) / compute_scale, for a batch of b.
  Applied to every number of the measured latency summary (mean, median, CI, ...),
  which a positive scale factor maps exactly.
* Memory per batch:   M(b) = a + s * b + r. The peak inference memory is measured at a
  few batch sizes (`measure.inference_memory`: parameters + activations for torch,
  model arrays + tracemalloc peak for scikit-learn, initializers + I/O for ONNX); a and s
  come from a least-squares line through those points and r is the largest amount any
  measured point lies above the line, so M(b) is never below a measurement.
* Auto-batch:         the largest power of two b <= max_batch with M(b) <= budget; none
  when even M(1) is over the budget.
* Fits (model alone): the model's own bytes (weights / model arrays / initializers)
  <= memory budget, and the serialized artifact <= flash when the profile sets flash.
* Energy (estimate):  E(b) [mJ per inference] = power_w [W] * t_target(b) [ms] / b,
  because 1 W for 1 ms is 1 mJ. It assumes the target draws its rated power for the
  whole inference and nothing between inferences; every key carrying it says
  `estimate`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
from pydantic import ConfigDict, Field, field_validator

from modules.core.artifact import ModelArtifact
from modules.core.profiles import Profile
from modules.core.registry import register_step
from modules.core.step import StepContext, StepOutput
from modules.errors import BadInputError
from modules.evaluation.inference import make_predictor
from modules.evaluation.measure import (
    DEFAULT_CI_TARGET,
    DEFAULT_MAX_TIME_S,
    TimingFields,
    batch_of,
    inference_memory,
    thread_count,
    time_batches,
)
from modules.storage.datasets import Dataset
from modules.storage.model_formats import save_model

MIB = 1024 * 1024
DEFAULT_MAX_BATCH = 4096
ENERGY_NOTE = (
    "estimate: energy per inference = profile power_w x measured latency / compute_scale "
    "/ batch size (W x ms = mJ); not a measurement"
)
LATENCY_NOTE = "estimate: measured latency on this machine / profile compute_scale"


# --- pure formulas -------------------------------------------------------------------------------


def estimated_latency_ms(measured_ms: float, *, compute_scale: float) -> float:
    """Latency on the target: measured latency / compute scale."""
    if compute_scale <= 0:
        raise BadInputError(f"compute_scale must be > 0, got {compute_scale}")
    return measured_ms / compute_scale


def energy_estimate_mj(latency_ms: float, *, power_w: float, batch_size: int = 1) -> float:
    """Energy per inference in millijoules: power (W) x latency (ms) / batch size."""
    if power_w <= 0:
        raise BadInputError(f"power_w must be > 0, got {power_w}")
    if batch_size < 1:
        raise BadInputError(f"batch_size must be >= 1, got {batch_size}")
    return power_w * latency_ms / batch_size


def scale_stat(stat: Mapping[str, Any], factor: float) -> dict[str, Any]:
    """A summarize() dict with every value multiplied by a positive factor (n kept)."""
    out = dict(stat)
    for key in ("mean", "median", "std", "min", "max"):
        if key in out and out[key] is not None:
            out[key] = float(out[key]) * factor
    for key in ("ci95", "median_ci95"):
        if key in out:
            out[key] = [float(v) * factor for v in out[key]]
    return out


def power_of_two_batches(max_batch: int = DEFAULT_MAX_BATCH) -> list[int]:
    """1, 2, 4, ... up to max_batch."""
    if max_batch < 1:
        raise BadInputError(f"max_batch must be >= 1, got {max_batch}")
    return [2**k for k in range(int(np.log2(max_batch)) + 1)]


@dataclass(frozen=True)
class MemoryCurve:
    """M(b) = intercept + per_sample * b + margin, fitted to measured peak memory."""

    intercept_bytes: float
    per_sample_bytes: float
    margin_bytes: float
    model_bytes: int
    measured: dict[int, int] = field(default_factory=dict)
    method: str = ""

    def predict(self, batch: int) -> float:
        return self.intercept_bytes + self.per_sample_bytes * batch + self.margin_bytes

    def as_dict(self) -> dict[str, Any]:
        return {
            "model_bytes": self.model_bytes,
            "intercept_bytes": self.intercept_bytes,
            "per_sample_bytes": self.per_sample_bytes,
            "margin_bytes": self.margin_bytes,
            "measured_bytes": {f"b{b}": v for b, v in sorted(self.measured.items())},
            "method": self.method,
            "formula": "M(b) = intercept + per_sample * b + margin (margin: max residual)",
        }


def fit_memory_curve(
    measured: Mapping[int, int], *, model_bytes: int, method: str = ""
) -> MemoryCurve:
    """Least-squares line through (batch, bytes), lifted to lie on or above every point."""
    if not measured:
        raise BadInputError("fit_memory_curve needs at least one measured batch size")
    batches = np.array(sorted(measured), dtype=np.float64)
    values = np.array([measured[int(b)] for b in batches], dtype=np.float64)
    if len(batches) == 1:
        # One point: all of it beyond the model is charged to that batch's samples.
        slope = max(values[0] - model_bytes, 0.0) / batches[0]
        intercept = values[0] - slope * batches[0]
    else:
        slope, intercept = np.polyfit(batches, values, 1)
        if slope < 0:  # memory never shrinks with more samples; noise can make it look so
            slope, intercept = 0.0, float(values.mean())
    residual = values - (intercept + slope * batches)
    margin = max(float(residual.max()), 0.0)
    return MemoryCurve(
        intercept_bytes=float(intercept),
        per_sample_bytes=float(slope),
        margin_bytes=margin,
        model_bytes=int(model_bytes),
        measured={int(b): int(v) for b, v in zip(batches, values, strict=True)},
        method=method,
    )


def pick_batch(
    curve: MemoryCurve, budget_bytes: float, *, max_batch: int = DEFAULT_MAX_BATCH
) -> int | None:
    """The largest power-of-two batch whose predicted memory fits the budget, or None."""
    if budget_bytes <= 0:
        raise BadInputError(f"memory budget must be > 0 bytes, got {budget_bytes}")
    best = None
    for batch in power_of_two_batches(max_batch):
        if curve.predict(batch) <= budget_bytes:
            best = batch
    return best


def _mb(n_bytes: float) -> str:
    return f"{n_bytes / MIB:.3f} MB"


def fit_verdict(
    *,
    model_bytes: int,
    serialized_bytes: int,
    memory_budget_mb: float,
    flash_mb: float | None,
) -> tuple[bool, list[str]]:
    """Does the model alone fit RAM (and flash)? Returns (fits, reasons with the numbers)."""
    budget = memory_budget_mb * MIB
    reasons = []
    fits = model_bytes <= budget
    relation = "<=" if fits else ">"
    reasons.append(
        f"model weights {_mb(model_bytes)} {relation} memory budget {_mb(budget)}"
        + ("" if fits else " (does not fit)")
    )
    if flash_mb is not None:
        flash = flash_mb * MIB
        flash_ok = serialized_bytes <= flash
        relation = "<=" if flash_ok else ">"
        reasons.append(
            f"serialized model {_mb(serialized_bytes)} {relation} flash {_mb(flash)}"
            + ("" if flash_ok else " (does not fit)")
        )
        fits = fits and flash_ok
    return fits, reasons


def noisy_note(stat: Mapping[str, Any]) -> str:
    """' (noisy timing: ...)' for a latency whose median CI missed its target, else ''."""
    if not stat.get("noisy"):
        return ""
    return (
        f" (noisy timing: median CI +/-{float(stat['ci_half_width_rel']):.0%} after "
        f"{stat['n']} runs, target +/-{float(stat['ci_target']):.0%})"
    )


# --- measurement ---------------------------------------------------------------------------------


class HardwareProbe:
    """Measurements of one model that budget evaluations share: memory curve, timings, size."""

    def __init__(
        self,
        artifact: ModelArtifact,
        data: Dataset,
        *,
        memory_batch_sizes: Sequence[int] = (1, 8, 64, 256),
        warmup: int = 3,
        runs: int = 20,
        ci_target: float = DEFAULT_CI_TARGET,
        max_time_s: float = DEFAULT_MAX_TIME_S,
    ) -> None:
        self.artifact = artifact
        self.x = data.X_test
        self.predictor = make_predictor(artifact)
        self.predictor.check_features(self.x)
        self.warmup = warmup
        self.runs = runs
        self.ci_target = ci_target
        self.max_time_s = max_time_s
        self.serialized_bytes = len(save_model(artifact))
        measured: dict[int, int] = {}
        model_bytes, method = 0, ""
        for size in sorted(set(memory_batch_sizes)):
            mem = inference_memory(artifact, batch_of(self.x, size))
            measured[size] = int(mem["bytes"])
            model_bytes, method = int(mem["model_bytes"]), str(mem["method"])
        self.curve = fit_memory_curve(measured, model_bytes=model_bytes, method=method)
        self._latency: dict[int, dict[str, Any]] = {}

    def latency(self, batch: int) -> dict[str, Any]:
        """Measured latency summary (ms) of one batch of `batch` rows; timed once, then cached."""
        if batch not in self._latency:
            stat, _ = time_batches(
                self.predictor.scores,
                batch_of(self.x, batch),
                warmup=self.warmup,
                runs=self.runs,
                ci_target=self.ci_target,
                max_time_s=self.max_time_s,
            )
            stat["batch_size"] = batch
            stat["threads"] = thread_count(self.artifact.framework)
            self._latency[batch] = stat
        return self._latency[batch]


def evaluate_budget(
    probe: HardwareProbe,
    *,
    memory_budget_mb: float,
    compute_scale: float,
    power_w: float,
    flash_mb: float | None = None,
    latency_budget_ms: float | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> dict[str, Any]:
    """Apply one budget to a probed model: fit, auto-batch, latency and energy estimates."""
    for name, value in (
        ("memory_budget_mb", memory_budget_mb),
        ("compute_scale", compute_scale),
        ("power_w", power_w),
    ):
        if not value > 0:
            raise BadInputError(f"{name} must be > 0, got {value}")
    budget_bytes = memory_budget_mb * MIB
    fits, reasons = fit_verdict(
        model_bytes=probe.curve.model_bytes,
        serialized_bytes=probe.serialized_bytes,
        memory_budget_mb=memory_budget_mb,
        flash_mb=flash_mb,
    )
    batch = pick_batch(probe.curve, budget_bytes, max_batch=max_batch)
    b1_bytes = probe.curve.predict(1)
    if batch is None:
        reasons.append(
            f"batch 1 needs {_mb(b1_bytes)} (model + activations) > budget {_mb(budget_bytes)}: "
            "no batch size runs"
        )
    else:
        reasons.append(
            f"auto-batch {batch}: predicted {_mb(probe.curve.predict(batch))} <= budget "
            f"{_mb(budget_bytes)}"
        )
    batches = sorted({1} | ({batch} if batch else set()))
    measured = {f"b{b}": probe.latency(b) for b in batches}
    estimated = {k: scale_stat(v, 1.0 / compute_scale) for k, v in measured.items()}
    energy = {
        k: scale_stat(v, power_w / int(v["batch_size"])) | {"unit": "mJ"}
        for k, v in estimated.items()
    }
    throughput = {
        k: int(v["batch_size"]) / (float(v["median"]) / 1000.0) for k, v in estimated.items()
    }
    est_b1 = float(estimated["b1"]["median"])
    meets_latency = None if latency_budget_ms is None else est_b1 <= latency_budget_ms
    if latency_budget_ms is not None:
        relation = "<=" if meets_latency else ">"
        reasons.append(
            f"estimated batch-1 latency {est_b1:.3f} ms {relation} budget {latency_budget_ms:g} ms"
            + noisy_note(measured["b1"])
        )
    return {
        "memory_budget_mb": memory_budget_mb,
        "memory_budget_bytes": int(budget_bytes),
        "compute_scale": compute_scale,
        "power_w": power_w,
        "flash_mb": flash_mb,
        "latency_budget_ms": latency_budget_ms,
        "fits": fits,
        "verdict": "fits" if fits else "does not fit",
        "fit_reasons": reasons,
        "runs_at_batch1": batch is not None,
        "auto_batch": batch,
        "auto_batch_predicted_bytes": None if batch is None else probe.curve.predict(batch),
        "batch1_predicted_bytes": b1_bytes,
        "serialized_bytes": probe.serialized_bytes,
        "model_bytes": probe.curve.model_bytes,
        "meets_latency_budget": meets_latency,
        "measured_latency_ms": measured,
        "estimated_latency_ms": estimated,
        "estimated_throughput_per_s": throughput,
        "energy_mj_per_inference_estimate": energy,
        "latency_note": LATENCY_NOTE,
        "energy_estimate_note": ENERGY_NOTE,
    }


# --- the step ------------------------------------------------------------------------------------


class HardwareSimParams(TimingFields):
    """Params of the `hardware_sim` step; unset budgets come from the job's profile."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    memory_batch_sizes: list[Annotated[int, Field(ge=1, le=65_536)]] = Field(
        default=[1, 8, 64, 256],
        min_length=1,
        max_length=12,
        description="Batch sizes at which peak inference memory is measured for the fit "
        "(each 1 to 65536 rows).",
    )
    max_batch: int = Field(
        default=DEFAULT_MAX_BATCH,
        ge=1,
        le=65_536,
        description="Largest batch the auto-batch search may pick (powers of two up to this).",
    )
    memory_budget_mb: float | None = Field(
        default=None, gt=0, le=1_048_576, description="Override the profile's memory budget (MB)."
    )
    compute_scale: float | None = Field(
        default=None, gt=0, le=100, description="Override the profile's compute scale."
    )
    power_w: float | None = Field(
        default=None, gt=0, le=10_000, description="Override the profile's power draw (W)."
    )

    @field_validator("memory_batch_sizes")
    @classmethod
    def _check_batches(cls, value: list[int]) -> list[int]:
        bad = [b for b in value if not 1 <= b <= 65_536]
        if bad:
            raise ValueError(f"memory_batch_sizes must be in [1, 65536], got {bad}")
        return sorted(set(value))


def budget_of(profile: Profile, params: HardwareSimParams) -> dict[str, Any]:
    """The budget a step applies: the profile's, with the params' overrides."""
    return {
        "memory_budget_mb": params.memory_budget_mb or profile.memory_budget_mb,
        "compute_scale": params.compute_scale or profile.compute_scale,
        "power_w": params.power_w or profile.power_w,
        "flash_mb": profile.flash_mb,
        "latency_budget_ms": profile.latency_budget_ms,
    }


@register_step("hardware_sim", params=HardwareSimParams, accepts={"torch", "sklearn", "onnx"})
def hardware_sim(
    model: ModelArtifact, data: Dataset, params: HardwareSimParams, ctx: StepContext
) -> StepOutput:
    """Estimate latency, auto-batch, memory fit and energy (estimate) on the job's profile."""
    probe = HardwareProbe(
        model,
        data,
        memory_batch_sizes=params.memory_batch_sizes,
        warmup=params.warmup,
        runs=params.runs,
        ci_target=params.ci_target,
        max_time_s=params.max_time_s,
    )
    metrics = evaluate_budget(probe, max_batch=params.max_batch, **budget_of(ctx.profile, params))
    metrics["profile"] = ctx.profile.name
    metrics["memory_curve"] = probe.curve.as_dict()
    metrics["threads"] = thread_count(model.framework)
    return StepOutput(model=None, metrics=metrics)


def main(argv: list[str] | None = None) -> int:
    """`python -m modules.evaluation.hardware_sim --input-model m.pt --profile edge-8mb`."""
    from modules.pipeline.script import script_main

    return script_main("hardware_sim", argv)


if __name__ == "__main__":
    raise SystemExit(main())
