"""Sweeps: one step over a list of values of one param, and the hardware-budget sweep.

`sweep` calls another registered step's function in-process, through the registry, on a
copy of its input model once per value (`{**base_params, param: value}`), measures each
candidate with `measure_model` and writes the trade-off table with the Pareto front over
(size, batch-1 latency, accuracy). The input model itself is the first row (`input`), so
every table has its reference. With repeats > 1 every value runs on the deterministic seed
schedule of `repeat.py` and each number becomes a mean with its 95% CI and n.

`budget_sweep` probes a model once (memory curve, timings) and applies every pair of
memory budget x compute scale with `hardware_sim.evaluate_budget`: fit, auto-batch,
estimated latency and energy (estimate).

Both pass their input model through; the tables and plots are files of the step.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
from collections.abc import Sequence
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from modules.core.artifact import ModelArtifact
from modules.core.profiles import Profile
from modules.core.registry import get_step, register_step
from modules.core.step import StepContext, StepOutput
from modules.errors import BadInputError, IncompatibleError, McaasError
from modules.evaluation.hardware_sim import HardwareProbe, evaluate_budget
from modules.evaluation.measure import MeasureParams, measure_model
from modules.evaluation.pareto import DEFAULT_MAXIMIZE, DEFAULT_MINIMIZE, pareto_front, tradeoff_x
from modules.evaluation.plots import pareto_figure, render, resource_figure, tradeoff_figure
from modules.evaluation.repeat import repeat_runs
from modules.evaluation.stats import summarize
from modules.storage.datasets import Dataset

# Steps that run other steps, or only read the job's records: sweeping them means nothing.
NOT_SWEEPABLE = frozenset({"sweep", "budget_sweep", "auto", "report", "train"})
ROW_COLUMNS = (
    "label",
    "value",
    "size_bytes",
    "params",
    "nonzero_params",
    "sparsity",
    "accuracy",
    "latency_ms",
    "latency_ci95",
    "latency_noisy",
    "latency_b64_ms",
    "memory_bytes",
    "estimated_latency_ms",
    "energy_mj_estimate",
    "n",
    "pareto",
    "error",
)


class CandidateRejected(McaasError):
    """A candidate's own step returned a failed verdict."""

    code = "candidate_rejected"


# --- validating a step call by name --------------------------------------------------------------


def _format_error(exc: ValidationError) -> str:
    from modules.core.jobspec import format_validation_error

    return format_validation_error(exc)


def step_params(step: str, params: dict[str, Any], *, who: str) -> BaseModel:
    """Validate `params` against step `step`'s params model; errors name the step and param."""
    registered = get_step(step)
    try:
        return registered.params.model_validate(params)
    except ValidationError as exc:
        raise BadInputError(
            f"{who}: invalid params for step {step!r}: {_format_error(exc)}"
        ) from None


def check_sweepable(step: str, param: str | None = None, *, who: str) -> None:
    """The step exists and can be swept; `param` (if given) is one of its params."""
    registered = get_step(step)
    if step in NOT_SWEEPABLE:
        raise BadInputError(f"{who}: step {step!r} cannot be swept (it is not a model transform)")
    if param is not None and param not in registered.params.model_fields:
        known = ", ".join(registered.params.model_fields) or "(none)"
        raise BadInputError(
            f"{who}: unknown sweep param {param!r} for step {step!r}; its params are: {known}"
        )


# --- running and measuring candidates ------------------------------------------------------------


def copy_artifact(artifact: ModelArtifact) -> ModelArtifact:
    """A deep copy, so a step that changes its model in place leaves the input intact."""
    return ModelArtifact(
        artifact.framework, copy.deepcopy(artifact.obj), copy.deepcopy(artifact.meta)
    )


def sub_context(ctx: StepContext, *, name: str, seed: int, tag: str) -> StepContext:
    """A context for a step run inside this one: own scratch dir, the given seed."""
    workdir = ctx.workdir / tag
    workdir.mkdir(parents=True, exist_ok=True)
    return dataclasses.replace(ctx, seed=seed, step_name=f"{ctx.step_name}/{name}", workdir=workdir)


def apply_steps(
    model: ModelArtifact,
    data: Dataset,
    calls: Sequence[tuple[str, BaseModel]],
    ctx: StepContext,
    *,
    seed: int,
    tag: str,
) -> tuple[ModelArtifact, dict[str, Any]]:
    """Run registered steps one after another on a copy of `model`; returns (model, metrics)."""
    current = copy_artifact(model)
    metrics: dict[str, Any] = {}
    for i, (name, params) in enumerate(calls):
        registered = get_step(name)
        if current.framework not in registered.accepts:
            raise IncompatibleError(
                f"step {name!r} accepts {sorted(registered.accepts)} models, "
                f"got {current.framework!r}"
            )
        sub = sub_context(ctx, name=name, seed=seed, tag=f"{tag}-{i}")
        out = registered.fn(current, data, params, sub)
        if out.verdict is not None and not out.verdict.passed:
            raise CandidateRejected(f"{name} rejected it: {out.verdict.reason}")
        metrics[name] = out.metrics
        if out.model is not None:
            current = out.model
    return current, metrics


def timing_keys(step_metrics: dict[str, Any]) -> dict[str, float]:
    """Numbers named *time_s in the steps' metrics (training / fine-tuning time), flattened."""
    from modules.evaluation.repeat import flatten_numbers

    return {
        f"step.{k}": v for k, v in flatten_numbers(step_metrics).items() if k.endswith("time_s")
    }


def candidate_row(
    artifact: ModelArtifact,
    data: Dataset,
    *,
    profile: Profile,
    measure: MeasureParams,
) -> dict[str, Any]:
    """The trade-off numbers of one model: size, params, accuracy, latency, memory, energy."""
    m = measure_model(artifact, data, measure)
    b1 = m["latency_ms"]["b1"]
    row: dict[str, Any] = {
        "framework": artifact.framework,
        "size_bytes": m["size_bytes"],
        "params": m["params"],
        "nonzero_params": m["nonzero_params"],
        "sparsity": m["sparsity"],
        "accuracy": m["accuracy"],
        "latency_ms": b1["median"],
        "latency_ci95": b1.get("median_ci95", b1["ci95"]),
        # The CI stayed wider than the timing target: compare it to others with care.
        "latency_noisy": bool(b1.get("noisy", False)),
        "memory_bytes": m["memory"]["b1"]["bytes"],
        "model_bytes": m["memory"]["b1"]["model_bytes"],
        # Estimates for the job's profile (formulas in hardware_sim): latency / compute scale,
        # power x that latency.
        "estimated_latency_ms": b1["median"] / profile.compute_scale,
        "energy_mj_estimate": profile.power_w * b1["median"] / profile.compute_scale,
    }
    for key, stat in m["latency_ms"].items():
        if key != "b1":
            row[f"latency_{key}_ms"] = stat["median"]
            row[f"latency_{key}_noisy"] = bool(stat.get("noisy", False))
    return row


def measured_candidate(
    model: ModelArtifact,
    data: Dataset,
    calls: Sequence[tuple[str, BaseModel]],
    ctx: StepContext,
    *,
    measure: MeasureParams,
    repeats: int,
    tag: str,
) -> tuple[ModelArtifact | None, dict[str, Any]]:
    """Run `calls` on the model and measure the result, `repeats` times on the seed schedule.

    Returns the candidate of the first seed and its row; with repeats > 1 each number of the
    row is the mean over the runs and `stats` holds their summaries (mean, std, 95% CI, n).
    A candidate whose step fails with our error becomes a row with `error` and no model.
    """
    kept: dict[str, Any] = {}

    def one_run(seed: int) -> dict[str, Any]:
        artifact, step_metrics = (
            apply_steps(model, data, calls, ctx, seed=seed, tag=f"{tag}-s{seed}")
            if calls
            else (model, {})
        )
        row = candidate_row(artifact, data, profile=ctx.profile, measure=measure)
        row.update(timing_keys(step_metrics))
        if "artifact" not in kept:
            kept.update(artifact=artifact, row=row, step_metrics=step_metrics)
        return {k: v for k, v in row.items() if k != "latency_ci95"}

    try:
        if repeats <= 1:
            one_run(ctx.seed)
            row = dict(kept["row"])
            row["n"] = 1
        else:
            result = repeat_runs(one_run, repeats, ctx.seed)
            row = dict(kept["row"])
            for name, stat in result["metrics"].items():
                row[name] = stat["mean"]
            row["latency_ci95"] = result["metrics"]["latency_ms"]["ci95"]
            row["stats"] = result["metrics"]
            row["seeds"] = result["seeds"]
            row["n"] = repeats
    except McaasError as exc:
        return None, {"error": f"{type(exc).__name__}: {exc}"}
    return kept["artifact"], row


def mark_pareto(rows: list[dict[str, Any]]) -> list[int]:
    """Set row["pareto"] on every row; returns the front's indices."""
    front = pareto_front(rows, minimize=DEFAULT_MINIMIZE, maximize=DEFAULT_MAXIMIZE)
    for i, row in enumerate(rows):
        row["pareto"] = i in front
    return front


def rows_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str] = ROW_COLUMNS) -> bytes:
    """Rows as CSV text (extra keys beyond `columns` are appended, lists as JSON)."""
    extra = sorted({k for r in rows for k in r if k not in columns and k != "stats"})
    fields = [c for c in columns if any(c in r for r in rows)] + extra
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {
                k: json.dumps(v) if isinstance(v, list | dict) else v
                for k, v in row.items()
                if k in fields
            }
        )
    return buf.getvalue().encode()


def plot_files(prefix: str, figures: dict[str, Any]) -> dict[str, bytes]:
    """{prefix_name.png: ..., prefix_name.svg: ...} for each figure."""
    files = {}
    for name, fig in figures.items():
        for fmt, blob in render(fig).items():
            files[f"{prefix}_{name}.{fmt}"] = blob
    return files


# --- the sweep step ------------------------------------------------------------------------------


class SweepParams(BaseModel):
    """Params of the `sweep` step."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    step: str = Field(min_length=1, max_length=64, description="The registered step to sweep.")
    param: str = Field(min_length=1, max_length=64, description="The step param to vary.")
    values: list[Any] = Field(
        min_length=1, max_length=50, description="The values of `param` to try, in order."
    )
    base_params: dict[str, Any] = Field(
        default_factory=dict, description="The step's other params, fixed for every value."
    )
    repeats: int | None = Field(
        default=None,
        ge=1,
        le=20,
        description="Runs per value on the deterministic seed schedule; none = the job's repeats.",
    )
    latency_batch: int = Field(
        default=64, ge=1, le=65_536, description="Second batch size timed (batch 1 always is)."
    )
    warmup: int = Field(default=3, ge=0, le=1000, description="Untimed runs before timing.")
    runs: int = Field(default=10, ge=2, le=10_000, description="Timed runs per batch size.")

    @model_validator(mode="after")
    def _check_against_step(self) -> SweepParams:
        check_sweepable(self.step, self.param, who="sweep")
        if self.param in self.base_params:
            raise ValueError(f"sweep: {self.param!r} is swept; drop it from base_params")
        for value in self.values:
            step_params(self.step, {**self.base_params, self.param: value}, who="sweep")
        return self


@register_step("sweep", params=SweepParams, accepts={"torch", "sklearn"})
def sweep(model: ModelArtifact, data: Dataset, params: SweepParams, ctx: StepContext) -> StepOutput:
    """Run a step over values of one param: trade-off table, Pareto front (size, latency, acc)."""
    measure = MeasureParams(
        batch_sizes=sorted({1, params.latency_batch}), warmup=params.warmup, runs=params.runs
    )
    repeats = params.repeats or ctx.repeats
    _, base_row = measured_candidate(model, data, [], ctx, measure=measure, repeats=1, tag="input")
    rows = [{"label": "input", "value": None, **base_row}]
    for i, value in enumerate(params.values):
        call = step_params(params.step, {**params.base_params, params.param: value}, who="sweep")
        _, row = measured_candidate(
            model, data, [(params.step, call)], ctx, measure=measure, repeats=repeats, tag=f"v{i}"
        )
        rows.append({"label": f"{params.param}={value}", "value": value, **row})
    front = mark_pareto(rows)
    x, x_label = tradeoff_x(rows, params.param)
    measured = [r for r in rows if "error" not in r]
    figures = {
        "tradeoff": tradeoff_figure(
            [r for r in measured if r["value"] is not None or x == "sparsity"], x=x, x_label=x_label
        ),
        "pareto": pareto_figure(rows, front),
        "resources": resource_figure(rows),
    }
    table = {"step": params.step, "param": params.param, "rows": rows}
    files = {
        "sweep.csv": rows_csv(rows),
        "sweep.json": json.dumps(table, indent=2, default=str).encode(),
        **plot_files("sweep", figures),
    }
    metrics = {
        "step": params.step,
        "param": params.param,
        "values": list(params.values),
        "repeats": repeats,
        "rows": rows,
        "pareto_front": [rows[i]["label"] for i in front],
        "errors": sum("error" in r for r in rows),
        "energy_estimate_note": "energy_mj_estimate = power_w x latency / compute_scale",
    }
    return StepOutput(model=None, metrics=metrics, files=files)


# --- the hardware-budget sweep -------------------------------------------------------------------

PositiveMb = Annotated[float, Field(gt=0, le=1_048_576)]
PositiveScale = Annotated[float, Field(gt=0, le=100)]


class BudgetSweepParams(BaseModel):
    """Params of the `budget_sweep` step."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    memory_budgets_mb: list[PositiveMb] = Field(
        default=[0.25, 1.0, 8.0, 64.0],
        min_length=1,
        max_length=20,
        description="Memory budgets to try, in MB (each > 0).",
    )
    compute_scales: list[PositiveScale] = Field(
        default=[0.05, 0.25, 0.75, 1.0, 2.0],
        min_length=1,
        max_length=20,
        description="Compute scales to try (target speed / measuring CPU speed, each > 0).",
    )
    power_w: float | None = Field(
        default=None, gt=0, le=10_000, description="Power draw in W; none = the profile's."
    )
    max_batch: int = Field(
        default=4096, ge=1, le=65_536, description="Largest batch the auto-batch may pick."
    )
    warmup: int = Field(default=3, ge=0, le=1000, description="Untimed runs before timing.")
    runs: int = Field(default=10, ge=2, le=10_000, description="Timed runs per batch size.")


def budget_rows(
    probe: HardwareProbe,
    *,
    memory_budgets_mb: Sequence[float],
    compute_scales: Sequence[float],
    power_w: float,
    flash_mb: float | None,
    latency_budget_ms: float | None,
    max_batch: int,
) -> list[dict[str, Any]]:
    """One row per (memory budget, compute scale) with fit, auto-batch, latency and energy."""
    rows = []
    for mem in memory_budgets_mb:
        for scale in compute_scales:
            ev = evaluate_budget(
                probe,
                memory_budget_mb=mem,
                compute_scale=scale,
                power_w=power_w,
                flash_mb=flash_mb,
                latency_budget_ms=latency_budget_ms,
                max_batch=max_batch,
            )
            batch = ev["auto_batch"]
            at_batch = f"b{batch}" if batch else None
            rows.append(
                {
                    "memory_budget_mb": mem,
                    "compute_scale": scale,
                    "fits": ev["fits"],
                    "auto_batch": batch,
                    "estimated_latency_ms": ev["estimated_latency_ms"]["b1"]["median"],
                    "estimated_latency_ci95": ev["estimated_latency_ms"]["b1"].get(
                        "median_ci95", ev["estimated_latency_ms"]["b1"]["ci95"]
                    ),
                    "estimated_latency_at_auto_batch_ms": (
                        ev["estimated_latency_ms"][at_batch]["median"] if at_batch else None
                    ),
                    "energy_mj_estimate": ev["energy_mj_per_inference_estimate"]["b1"]["median"],
                    "energy_mj_estimate_at_auto_batch": (
                        ev["energy_mj_per_inference_estimate"][at_batch]["median"]
                        if at_batch
                        else None
                    ),
                    "meets_latency_budget": ev["meets_latency_budget"],
                    "fit_reasons": ev["fit_reasons"],
                }
            )
    return rows


@register_step("budget_sweep", params=BudgetSweepParams, accepts={"torch", "sklearn", "onnx"})
def budget_sweep(
    model: ModelArtifact, data: Dataset, params: BudgetSweepParams, ctx: StepContext
) -> StepOutput:
    """Sweep memory budgets x compute scales: fit, auto-batch, latency and energy (estimates)."""
    from modules.evaluation.plots import budget_figure

    probe = HardwareProbe(model, data, warmup=params.warmup, runs=params.runs)
    rows = budget_rows(
        probe,
        memory_budgets_mb=params.memory_budgets_mb,
        compute_scales=params.compute_scales,
        power_w=params.power_w or ctx.profile.power_w,
        flash_mb=ctx.profile.flash_mb,
        latency_budget_ms=ctx.profile.latency_budget_ms,
        max_batch=params.max_batch,
    )
    columns = (
        "memory_budget_mb",
        "compute_scale",
        "fits",
        "auto_batch",
        "estimated_latency_ms",
        "estimated_latency_ci95",
        "estimated_latency_at_auto_batch_ms",
        "energy_mj_estimate",
        "energy_mj_estimate_at_auto_batch",
        "meets_latency_budget",
        "fit_reasons",
    )
    measured_b1 = probe.latency(1)
    files = {
        "budget_sweep.csv": rows_csv(rows, columns),
        "budget_sweep.json": json.dumps(rows, indent=2, default=str).encode(),
        **plot_files("budget_sweep", {"grid": budget_figure(rows)}),
    }
    metrics = {
        "rows": rows,
        "measured_latency_b1_ms": measured_b1,
        "memory_curve": probe.curve.as_dict(),
        "serialized_bytes": probe.serialized_bytes,
        "n_fit": sum(bool(r["fits"]) for r in rows),
        "n_runs_at_batch1": sum(r["auto_batch"] is not None for r in rows),
        "energy_estimate_note": "latency = measured / compute_scale; energy = power_w x that",
        "latency_spread_ms": summarize([r["estimated_latency_ms"] for r in rows], unit="ms"),
    }
    return StepOutput(model=None, metrics=metrics, files=files)


def main(argv: list[str] | None = None) -> int:
    """`python -m modules.search.sweep --input-model m.pt --step S --param P --values JSON`."""
    from modules.pipeline.script import script_main

    return script_main("sweep", argv)


if __name__ == "__main__":
    raise SystemExit(main())
