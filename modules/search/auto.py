"""The `auto` step: accuracy-aware search for the best compression that meets a budget.

Given the job's profile and a largest accuracy drop, `auto` tries the compression params
of the chosen steps and returns the best candidate that meets the budget:

* accuracy >= floor, where floor = baseline - max_drop/100 (absolute: max_drop in
  percentage points) or baseline * (1 - max_drop/100) (relative: max_drop in percent);
* batch-1 inference memory (model + activations, measured) <= the profile's memory budget;
* serialized size <= the profile's flash, when it sets one;
* estimated batch-1 latency (measured / compute_scale) <= the profile's latency budget,
  when it sets one.

Among the candidates that meet all of them, the best has the smallest `objective` (size,
latency or energy estimate), ties going to the higher accuracy; on latency and energy, two
candidates whose latency CIs overlap are a tie (no measurable difference), settled by
accuracy, then size. The input model is always
candidate 0, so the search never ends with nothing: when no candidate meets the budget,
the best-so-far (fewest failed checks, then highest accuracy, then smallest objective) is
returned with the reason. The search space is each space's grid (the cartesian product of
its param lists), spaces interleaved round-robin so every step gets trials, cut at
max_trials; no new trial starts after max_time_s (a running one finishes).

Per-layer amounts: when the job ran a `sensitivity` step before this one (and
use_sensitivity is on), every trial of the step that scan feeds (prune_structured for
prune/unstructured, lowrank for lowrank) is followed by a twin with a `layers` param built
from the scan: a layer whose safe level (the strongest level whose one-layer drop stayed
within this search's max_drop) is weaker than the trial's gets that level, and a layer
with no safe level is skipped. Both compete under the same budget and ranking.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from modules.core.artifact import ModelArtifact
from modules.core.profiles import Profile
from modules.core.registry import register_step
from modules.core.step import StepContext, StepOutput
from modules.errors import BadInputError, IncompatibleError
from modules.evaluation.hardware_sim import MIB
from modules.evaluation.measure import MeasureParams
from modules.evaluation.plots import pareto_figure, resource_figure
from modules.search.sensitivity import TARGET_STEP, candidate_layers, safe_levels
from modules.search.sweep import (
    check_sweepable,
    mark_pareto,
    measured_candidate,
    plot_files,
    rows_csv,
    step_params,
)
from modules.storage.datasets import Dataset

OBJECTIVE_KEYS = {
    "size": "size_bytes",
    "latency": "estimated_latency_ms",
    "energy": "energy_mj_estimate",
}


class StepCallParams(BaseModel):
    """A fixed step run after each candidate of a search space (e.g. quantize_dynamic)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=64, description="A registered step.")
    params: dict[str, Any] = Field(default_factory=dict, description="Its params.")


# Most trial combinations one search space may name; max_trials (at most 500) caps what
# runs, this caps what is validated when the job is submitted.
MAX_GRID_COMBINATIONS = 1000


class SearchSpace(BaseModel):
    """One step and the values of its params to try (their cartesian product)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    step: str = Field(min_length=1, max_length=64, description="The registered step to search.")
    grid: dict[str, Annotated[list[Any], Field(max_length=50)]] = Field(
        max_length=8,
        description="param -> values to try; every combination is one trial (at most 8 "
        f"params of 50 values each, and {MAX_GRID_COMBINATIONS} combinations).",
    )
    base_params: dict[str, Any] = Field(
        default_factory=dict, description="The step's other params, fixed for every trial."
    )
    then: list[StepCallParams] = Field(
        default_factory=list,
        max_length=5,
        description="Fixed steps applied after the searched one, in order.",
    )

    @model_validator(mode="after")
    def _check_against_step(self) -> SearchSpace:
        if not self.grid:
            raise ValueError(f"auto: the search space of {self.step!r} has an empty grid")
        for param, values in self.grid.items():
            check_sweepable(self.step, param, who="auto")
            if not values:
                raise ValueError(f"auto: {self.step}.{param} has no values to try")
            if param in self.base_params:
                raise ValueError(f"auto: {param!r} is searched; drop it from base_params")
        n_combos = math.prod(len(values) for values in self.grid.values())
        if n_combos > MAX_GRID_COMBINATIONS:
            # Each combination is validated here, before anything runs: bound that work.
            raise ValueError(
                f"auto: the grid of {self.step!r} has {n_combos} combinations, over "
                f"{MAX_GRID_COMBINATIONS}"
            )
        for combo in self.combinations():
            step_params(self.step, combo, who="auto")
        for call in self.then:
            check_sweepable(call.name, who="auto")
            step_params(call.name, call.params, who="auto")
        return self

    def combinations(self) -> Iterator[dict[str, Any]]:
        names = list(self.grid)
        for values in itertools.product(*(self.grid[n] for n in names)):
            yield {**self.base_params, **dict(zip(names, values, strict=True))}


class AccuracyGoalFields(BaseModel):
    """How much accuracy a search may give up: shared by `auto` and `compress`."""

    max_drop: float = Field(
        default=1.0,
        ge=0,
        le=100,
        description="Largest accuracy drop allowed: percentage points (absolute) or percent "
        "of the baseline (relative).",
    )
    drop_kind: Literal["absolute", "relative"] = Field(
        default="absolute", description="How max_drop is read."
    )


class AutoParams(AccuracyGoalFields):
    """Params of the `auto` step."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    search: list[SearchSpace] = Field(
        default_factory=list,
        max_length=10,
        description="Search spaces; empty = a default space for the input model's kind.",
    )
    objective: Literal["size", "latency", "energy"] = Field(
        default="size", description="What the best candidate minimizes among those that pass."
    )
    max_trials: int = Field(default=12, ge=1, le=500, description="Most candidates tried.")
    max_time_s: float = Field(
        default=300.0, gt=0, le=86_400, description="No new trial starts after this many seconds."
    )
    latency_batch: int = Field(
        default=64, ge=1, le=65_536, description="Second batch size timed (batch 1 always is)."
    )
    warmup: int = Field(default=3, ge=0, le=1000, description="Untimed runs before timing.")
    runs: int = Field(default=10, ge=2, le=10_000, description="Timed runs per batch size.")
    use_sensitivity: bool = Field(
        default=True,
        description="When the job ran a `sensitivity` step earlier, also try each matching "
        "prune/lowrank trial with per-layer amounts derived from it.",
    )


def default_search(model: ModelArtifact) -> list[SearchSpace]:
    """A sensible search for the model's kind, from the steps that are registered."""
    from modules.core.registry import list_steps

    known = {s.name: s for s in list_steps()}
    wanted: list[tuple[str, dict[str, list[Any]], dict[str, Any]]]
    if model.framework == "torch":
        wanted = [
            ("prune_structured", {"amount": [0.25, 0.5, 0.75, 0.9]}, {"method": "structured"}),
            ("lowrank", {"ratio": [0.1, 0.25, 0.5]}, {"rank_rule": "ratio"}),
            # int8 weights alone: ~4x smaller with no drop in the project's torch table.
            ("quantize_dynamic", {"dtype": ["int8"]}, {}),
        ]
    else:
        final = getattr(model.obj, "steps", [[None, model.obj]])[-1][1]
        name = type(final).__name__
        if "KNeighbors" in name:
            wanted = [
                ("knn_prototypes", {"ratio": [0.05, 0.1, 0.2, 0.4]}, {"method": "kmeans"}),
            ]
        elif hasattr(final, "estimators_"):
            wanted = [("forest_prune", {"n_trees": [5, 10, 20, 40]}, {})]
        else:
            wanted = [("feature_prune", {"keep_ratio": [0.25, 0.5, 0.75]}, {})]
    spaces = []
    for step, grid, base in wanted:
        registered = known.get(step)
        fields = registered.params.model_fields if registered else {}
        if (
            registered
            and model.framework in registered.accepts
            and set(grid) | set(base) <= set(fields)
        ):
            spaces.append(SearchSpace(step=step, grid=grid, base_params=base))
    if not spaces:
        raise BadInputError(
            f"auto: no registered compression step has a default search for a "
            f"{model.framework} {type(model.obj).__name__}; give `search` explicitly"
        )
    return spaces


def trial_plan(spaces: list[SearchSpace], max_trials: int) -> list[tuple[int, SearchSpace, dict]]:
    """(space index, space, params) for each trial: spaces interleaved, cut at max_trials."""
    queues = [list(space.combinations()) for space in spaces]
    plan = []
    for round_ in itertools.count():
        added = False
        for i, queue in enumerate(queues):
            if round_ < len(queue):
                plan.append((i, spaces[i], queue[round_]))
                added = True
        if not added or len(plan) >= max_trials:
            break
    return plan[:max_trials]


@dataclass(frozen=True)
class SensitivityGuide:
    """What an earlier `sensitivity` step says each layer can take within the accuracy drop."""

    index: int
    technique: str
    tolerance_pt: float
    safe: dict[str, float | None]

    def describe(self) -> dict[str, Any]:
        return {
            "from_step": self.index,
            "technique": self.technique,
            "tolerance_pt": self.tolerance_pt,
            "safe_levels": self.safe,
        }


def sensitivity_guide(
    history: Sequence[dict[str, Any]], model: ModelArtifact, *, tolerance_pt: float
) -> SensitivityGuide | None:
    """The newest sensitivity scan of this job, reduced to a safe level per layer, or None."""
    if model.framework != "torch":
        return None
    for record in reversed(history):
        metrics = record.get("metrics") or {}
        technique = metrics.get("technique")
        if record.get("step") != "sensitivity" or technique not in TARGET_STEP:
            continue
        rows = [r for r in metrics.get("rows") or [] if isinstance(r, dict)]
        # Only layers the input model still has: a step in between may have renamed them.
        present = set(candidate_layers(model.obj, technique, conv=True))
        safe = safe_levels(rows, technique=technique, max_drop_pt=tolerance_pt)
        safe = {layer: level for layer, level in safe.items() if layer in present}
        if not safe:
            return None
        return SensitivityGuide(int(record["index"]), technique, tolerance_pt, safe)
    return None


def guided_layers(
    guide: SensitivityGuide, step: str, combo: dict[str, Any], model: ModelArtifact
) -> dict[str, Any] | None:
    """The `layers` param the scan suggests for one trial, or None when it changes nothing."""
    target, fixed, key = TARGET_STEP[guide.technique]
    if step != target or "layers" in combo:
        return None
    params = step_params(step, combo, who="auto")
    if any(getattr(params, name) != value for name, value in fixed.items()):
        return None
    level = float(getattr(params, key))
    lowrank = guide.technique == "lowrank"
    allowed = _changeable(guide, params, model)
    layers: dict[str, Any] = {}
    for layer, safe in guide.safe.items():
        if layer not in allowed:
            continue
        if safe is None:
            layers[layer] = "skip"
        elif (safe > level) if lowrank else (safe < level):
            layers[layer] = {key: safe}
    return layers or None


def _changeable(guide: SensitivityGuide, params: Any, model: ModelArtifact) -> set[str]:
    """The layers the trial's step can change (lowrank's Conv2d only with conv)."""
    conv = bool(getattr(params, "conv", False))
    return set(candidate_layers(model.obj, guide.technique, conv=conv))


def with_sensitivity(
    plan: list[tuple[int, SearchSpace, dict[str, Any]]],
    guide: SensitivityGuide | None,
    model: ModelArtifact,
) -> list[tuple[int, SearchSpace, dict[str, Any]]]:
    """The plan with a per-layer twin right after each trial the scan has advice for.

    A twin that would repeat an earlier one (the scan capped every layer the same way for
    two global amounts) is left out.
    """
    if guide is None:
        return plan
    out = []
    seen: set[str] = set()
    for index, space, combo in plan:
        out.append((index, space, combo))
        layers = guided_layers(guide, space.step, combo, model)
        if layers is None:
            continue
        twin = {**combo, "layers": layers}
        key = json.dumps([index, _effective(twin, guide, model)], sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            out.append((index, space, twin))
    return out


def _effective(
    combo: dict[str, Any], guide: SensitivityGuide, model: ModelArtifact
) -> dict[str, Any]:
    """The combo without its global level when that level reaches no layer (all have their own)."""
    step, _, key = TARGET_STEP[guide.technique]
    params = step_params(step, combo, who="auto")
    if _changeable(guide, params, model) <= set(combo["layers"]):
        return {k: v for k, v in combo.items() if k != key}
    return combo


def _guided(space: SearchSpace, combo: dict[str, Any]) -> bool:
    return "layers" in combo and "layers" not in space.grid and "layers" not in space.base_params


def accuracy_floor(baseline: float, *, max_drop: float, drop_kind: str) -> float:
    """The lowest accuracy a candidate may have (accuracy as a fraction, max_drop in %)."""
    if drop_kind == "relative":
        return baseline * (1.0 - max_drop / 100.0)
    return baseline - max_drop / 100.0


def violations(row: dict[str, Any], *, floor: float, profile: Profile) -> list[str]:
    """The budget checks a measured candidate fails, each with its numbers."""
    out = []
    if row["accuracy"] < floor:
        out.append(f"accuracy {row['accuracy']:.4f} < floor {floor:.4f}")
    budget = profile.memory_budget_mb * MIB
    if row["memory_bytes"] > budget:
        out.append(
            f"batch-1 memory {row['memory_bytes'] / MIB:.3f} MB > budget "
            f"{profile.memory_budget_mb:g} MB"
        )
    if profile.flash_mb is not None and row["size_bytes"] > profile.flash_mb * MIB:
        out.append(f"file {row['size_bytes'] / MIB:.3f} MB > flash {profile.flash_mb:g} MB")
    if (
        profile.latency_budget_ms is not None
        and row["estimated_latency_ms"] > profile.latency_budget_ms
    ):
        out.append(
            f"estimated latency {row['estimated_latency_ms']:.3f} ms > budget "
            f"{profile.latency_budget_ms:g} ms"
        )
    return out


def rank_key(row: dict[str, Any], objective: str) -> tuple[float, ...]:
    """Smaller is better: failed checks, then objective (for passing) or accuracy (failing)."""
    n_failed = len(row["violations"])
    value = float(row[OBJECTIVE_KEYS[objective]])
    if n_failed == 0:
        return (0.0, value, -float(row["accuracy"]))
    return (float(n_failed), -float(row["accuracy"]), value)


def _latency_tied(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """True when the two rows' batch-1 latency CIs overlap: no measurable difference."""
    ia, ib = a.get("latency_ci95"), b.get("latency_ci95")
    if not (isinstance(ia, list | tuple) and isinstance(ib, list | tuple)):
        return False
    return bool(ia[0] <= ib[1] and ib[0] <= ia[1])


def beats(row: dict[str, Any], best: dict[str, Any], objective: str) -> bool:
    """Whether `row` should replace `best` as the search's choice.

    By `rank_key`, except that on the latency and energy objectives (both from measured
    latency) two passing rows whose latency CIs overlap are not told apart by latency:
    the more accurate, then the smaller, wins.
    """
    if (
        objective in ("latency", "energy")
        and not row["violations"]
        and not best["violations"]
        and _latency_tied(row, best)
    ):
        return (-float(row["accuracy"]), float(row["size_bytes"])) < (
            -float(best["accuracy"]),
            float(best["size_bytes"]),
        )
    return rank_key(row, objective) < rank_key(best, objective)


@register_step("auto", params=AutoParams, accepts={"torch", "sklearn"})
def auto(model: ModelArtifact, data: Dataset, params: AutoParams, ctx: StepContext) -> StepOutput:
    """Search compression params for the best candidate within the profile and accuracy drop."""
    start = time.perf_counter()
    spaces = params.search or default_search(model)
    measure = MeasureParams(
        batch_sizes=sorted({1, params.latency_batch}), warmup=params.warmup, runs=params.runs
    )
    _, baseline = measured_candidate(model, data, [], ctx, measure=measure, repeats=1, tag="input")
    if "error" in baseline:  # nothing to search from: the input itself does not fit the data
        raise IncompatibleError(f"the input model cannot be measured: {baseline['error']}")
    floor = accuracy_floor(
        baseline["accuracy"], max_drop=params.max_drop, drop_kind=params.drop_kind
    )
    baseline.update(label="input", step=None, trial_params=None)
    baseline["violations"] = violations(baseline, floor=floor, profile=ctx.profile)
    rows = [baseline]
    best_row, best_model = baseline, None
    stopped_by = "exhausted"
    guide = None
    if params.use_sensitivity:
        guide = sensitivity_guide(
            ctx.history, model, tolerance_pt=100.0 * (baseline["accuracy"] - floor)
        )
    n_combos = sum(1 for s in spaces for _ in s.combinations())
    full_plan = with_sensitivity(trial_plan(spaces, n_combos), guide, model)
    plan = full_plan[: params.max_trials]
    for n, (space_index, space, combo) in enumerate(plan):
        if time.perf_counter() - start > params.max_time_s:
            stopped_by = "max_time"
            break
        calls = [(space.step, step_params(space.step, combo, who="auto"))]
        calls += [(c.name, step_params(c.name, c.params, who="auto")) for c in space.then]
        artifact, row = measured_candidate(
            model, data, calls, ctx, measure=measure, repeats=1, tag=f"t{n}"
        )
        searched = {k: combo[k] for k in space.grid}
        label = f"{space.step}(" + ", ".join(f"{k}={v}" for k, v in searched.items()) + ")"
        if _guided(space, combo):
            searched["layers"] = combo["layers"]
            label += " per-layer (sensitivity)"
        if space.then:
            label += " + " + " + ".join(c.name for c in space.then)
        row.update(label=label, step=space.step, trial_params=searched, space=space_index)
        if artifact is None:
            row["violations"] = [f"failed: {row['error']}"]
        else:
            row["violations"] = violations(row, floor=floor, profile=ctx.profile)
            if beats(row, best_row, params.objective):
                best_row, best_model = row, artifact
        rows.append(row)
    else:
        if len(plan) < len(full_plan):
            stopped_by = "max_trials"
    measured = [r for r in rows if "error" not in r]
    front = mark_pareto(measured)
    met = not best_row["violations"]
    if met:
        reason = (
            f"best candidate {best_row['label']} meets the budget of profile {ctx.profile.name} "
            f"and the accuracy floor {floor:.4f} with the smallest {params.objective}"
        )
    else:
        reason = (
            f"no candidate met the budget of profile {ctx.profile.name}; returning the "
            f"best-so-far {best_row['label']}, which misses: " + "; ".join(best_row["violations"])
        )
    best_row["best"] = True
    summary = {
        "met_budget": met,
        "reason": reason,
        "best": best_row["label"],
        "objective": params.objective,
        "accuracy_floor": floor,
        "baseline_accuracy": baseline["accuracy"],
        "n_trials": len(rows) - 1,
        "stopped_by": stopped_by,
        "elapsed_s": time.perf_counter() - start,
        "pareto_front": [measured[i]["label"] for i in front],
        "sensitivity": guide.describe() if guide is not None else None,
    }
    files = {
        "auto_trials.csv": rows_csv(rows),
        "auto.json": json.dumps({**summary, "trials": rows}, indent=2, default=str).encode(),
        **plot_files(
            "auto",
            {"pareto": pareto_figure(measured, front), "resources": resource_figure(measured)},
        ),
    }
    metrics = {
        **summary,
        "best_row": best_row,
        "rows": rows,
        "accuracy": best_row["accuracy"],
        "size_bytes": best_row["size_bytes"],
    }
    return StepOutput(model=best_model, metrics=metrics, files=files)


def main(argv: list[str] | None = None) -> int:
    """`python -m modules.search.auto --input-model m.pt --output-model b.pt --max-drop 1`."""
    from modules.pipeline.script import ScriptOptions, script_main

    return script_main("auto", argv, ScriptOptions(aliases={"max_time_s": ["--max-time"]}))


if __name__ == "__main__":
    raise SystemExit(main())
