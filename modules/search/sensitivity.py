"""The `sensitivity` step: compress one layer at a time and record the accuracy drop.

For each candidate layer and each level, a copy of the model has only that layer changed,
with no fine-tuning, and is scored on the test split:

  prune         structured pruning removes `level` of the layer's neurons/channels (layers
                coupled to it by a residual add lose the same channels); the classifier,
                whose outputs are the classes, is not a candidate;
  unstructured  `level` of the layer's weights are zeroed by magnitude;
  lowrank       the layer is factorized at rank ceil(level x full rank) (level = share of the
                rank kept, so smaller is stronger); a rank that saves nothing leaves it as is.

The table has one row per (layer, level): accuracy, its drop in percentage points and the
parameters left. `recommended_layers` turns it into a `layers` param for prune_structured
or lowrank: each layer gets the strongest level whose drop stayed within `max_drop`, or
"skip" when none did. Drops measured one layer at a time do not add up exactly when many
layers change together; `auto` uses this table, when a job has it, to try per-layer amounts.
The input model passes through unchanged.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from modules.compression.layer_select import select_layers
from modules.compression.lowrank import lowrank_factorize
from modules.compression.prune_structured import (
    check_structured_support,
    classifier_name,
    prune_structured,
    prune_unstructured,
)
from modules.core.artifact import ModelArtifact
from modules.core.registry import register_step
from modules.core.step import StepContext, StepOutput
from modules.storage.datasets import Dataset
from modules.training.finetune import accuracy, check_fits_data

Technique = Literal["prune", "unstructured", "lowrank"]
DEFAULT_LEVELS: dict[str, list[float]] = {
    "prune": [0.25, 0.5, 0.75],
    "unstructured": [0.5, 0.75, 0.9],
    "lowrank": [0.5, 0.25, 0.1],
}
# The step whose `layers` param a scan of each technique feeds, and its fixed params.
TARGET_STEP: dict[str, tuple[str, dict[str, Any], str]] = {
    "prune": ("prune_structured", {"method": "structured"}, "amount"),
    "unstructured": ("prune_structured", {"method": "unstructured"}, "amount"),
    "lowrank": ("lowrank", {"rank_rule": "ratio"}, "ratio"),
}
CSV_COLUMNS = (
    "layer",
    "type",
    "level",
    "accuracy",
    "accuracy_drop_pt",
    "params_before",
    "params_after",
    "changed",
)


class SensitivityParams(BaseModel):
    """Params of the `sensitivity` step."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    technique: Technique = Field(
        default="prune",
        description="prune: structured (neurons/channels); unstructured: zero weights; "
        "lowrank: truncated SVD.",
    )
    levels: list[Annotated[float, Field(gt=0, le=1)]] | None = Field(
        default=None,
        min_length=1,
        max_length=10,
        description="Levels to try per layer: the amount removed (prune, unstructured; in "
        "(0, 1)) or the share of the rank kept (lowrank; in (0, 1]). Default: "
        "0.25/0.5/0.75, 0.5/0.75/0.9, 0.5/0.25/0.1.",
    )
    include: list[str] = Field(
        default_factory=list,
        max_length=256,
        description="fnmatch patterns of the layers to scan (default: every candidate); a "
        "pattern matching no candidate is an error.",
    )
    conv: bool = Field(
        default=False, description="lowrank: also scan Conv2d layers (as lowrank's conv does)."
    )
    max_drop: float = Field(
        default=1.0,
        ge=0,
        le=100,
        description="Largest accuracy drop (percentage points) a level may cost to be "
        "recommended for its layer.",
    )

    @model_validator(mode="after")
    def _check_levels(self) -> SensitivityParams:
        for level in self.levels or []:
            if self.technique == "lowrank" and not 0 < level <= 1:
                raise ValueError(f"lowrank levels are shares of the rank in (0, 1], got {level}")
            if self.technique != "lowrank" and not 0 < level < 1:
                raise ValueError(f"{self.technique} levels are amounts in (0, 1), got {level}")
        for pattern in self.include:
            if not pattern or len(pattern) > 200:
                raise ValueError(f"include: bad pattern {pattern!r} (1 to 200 characters)")
        return self

    def levels_or_default(self) -> list[float]:
        return list(self.levels) if self.levels else DEFAULT_LEVELS[self.technique]


def candidate_layers(model: nn.Module, technique: str, *, conv: bool = False) -> list[str]:
    """The layers a scan of `technique` changes, in module order."""
    if technique == "lowrank":
        return [
            n
            for n, m in model.named_modules()
            if type(m) is nn.Linear or (conv and type(m) is nn.Conv2d and m.groups == 1)
        ]
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    if technique == "prune":
        # Its outputs are the classes: structured pruning never removes them.
        logits = classifier_name(model)
        names = [n for n in names if n != logits]
    return names


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def compress_one_layer(
    model: nn.Module, layer: str, level: float, *, technique: str, in_features: int
) -> nn.Module:
    """A copy of `model` with only `layer` compressed at `level`."""
    if technique == "prune":
        return prune_structured(
            model, amount=0.0, in_features=in_features, layers={layer: {"amount": level}}
        )
    if technique == "unstructured":
        pruned, _ = prune_unstructured(model, amount=0.0, layer_amounts={f"{layer}.weight": level})
        return pruned
    # An exact name wins over the wildcard, so only `layer` is factorized.
    factorized, _ = lowrank_factorize(
        model, conv=True, layers={layer: {"ratio": level}, "*": "skip"}
    )
    return factorized


def scan(
    model: nn.Module,
    data: Dataset,
    *,
    technique: str,
    levels: Sequence[float],
    layers: Sequence[str],
) -> list[dict[str, Any]]:
    """One row per (layer, level): accuracy after compressing that layer alone."""
    baseline = accuracy(model, data.X_test, data.y_test)
    modules = dict(model.named_modules())
    before = _n_params(model)
    rows = []
    for layer in layers:
        for level in levels:
            changed = compress_one_layer(
                model, layer, level, technique=technique, in_features=data.n_features
            )
            acc = accuracy(changed, data.X_test, data.y_test)
            after = _n_params(changed)
            zeros = technique == "unstructured"
            rows.append(
                {
                    "layer": layer,
                    "type": type(modules[layer]).__name__,
                    "level": level,
                    "accuracy": acc,
                    "accuracy_drop_pt": 100.0 * (baseline - acc),
                    "params_before": before,
                    "params_after": after,
                    # Unstructured pruning zeroes weights in place of removing them.
                    "changed": zeros or after != before,
                }
            )
    return rows


def safe_levels(
    rows: Sequence[dict[str, Any]], *, technique: str, max_drop_pt: float
) -> dict[str, float | None]:
    """layer -> the strongest level whose drop stayed within max_drop_pt (None: none did)."""
    out: dict[str, float | None] = {}
    for row in rows:
        layer = row["layer"]
        out.setdefault(layer, None)
        drop = row.get("accuracy_drop_pt")
        # A level that left the layer as it was (a rank saving nothing) recommends nothing.
        if drop is None or drop > max_drop_pt or not row.get("changed", True):
            continue
        best = out[layer]
        level = float(row["level"])
        # Pruning: a larger amount is stronger; lowrank: a smaller kept share is.
        stronger = best is None or (level < best if technique == "lowrank" else level > best)
        if stronger:
            out[layer] = level
    return out


def recommended_layers(
    rows: Sequence[dict[str, Any]], *, technique: str, max_drop_pt: float
) -> dict[str, Any]:
    """A `layers` param for the technique's step: each layer's safe level, or "skip"."""
    key = TARGET_STEP[technique][2]
    return {
        layer: "skip" if level is None else {key: level}
        for layer, level in safe_levels(rows, technique=technique, max_drop_pt=max_drop_pt).items()
    }


def rows_csv(rows: Sequence[dict[str, Any]]) -> bytes:
    """The scan table as CSV."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    return buf.getvalue().encode()


@register_step("sensitivity", params=SensitivityParams, accepts={"torch"})
def sensitivity(
    model: ModelArtifact, data: Dataset, params: SensitivityParams, ctx: StepContext
) -> StepOutput:
    """Compress one layer at a time over a few levels; record the accuracy drop of each."""
    check_fits_data(model.obj, data.X_test, num_classes=data.n_classes, what="the model")
    if params.technique == "prune":
        check_structured_support(model.obj)
    names = candidate_layers(model.obj, params.technique, conv=params.conv)
    if params.include:
        hint = " (the classifier is never pruned)" if params.technique == "prune" else ""
        names = select_layers(params.include, names, step="sensitivity", hint=hint)
    levels = params.levels_or_default()
    rows = scan(model.obj, data, technique=params.technique, levels=levels, layers=names)
    step, base, key = TARGET_STEP[params.technique]
    if params.technique == "lowrank" and params.conv:
        base = {**base, "conv": True}
    metrics = {
        "technique": params.technique,
        "levels": levels,
        "level_means": key,
        "baseline_accuracy": accuracy(model.obj, data.X_test, data.y_test),
        "layers_scanned": names,
        "rows": rows,
        "max_drop": params.max_drop,
        "recommended_step": step,
        "recommended_params": {
            **base,
            "layers": recommended_layers(
                rows, technique=params.technique, max_drop_pt=params.max_drop
            ),
        },
    }
    return StepOutput(model=None, metrics=metrics, files={"sensitivity.csv": rows_csv(rows)})


def main(argv: list[str] | None = None) -> int:
    """`python -m modules.search.sensitivity --input-model m.pt [--technique prune]`."""
    from modules.pipeline.script import script_main

    return script_main("sensitivity", argv)


if __name__ == "__main__":
    raise SystemExit(main())
