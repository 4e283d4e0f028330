"""Named pipelines a user can start without writing a job spec (dashboard and `mcaas submit`).

Each preset is an ordinary list of steps, validated against the registry like any job spec.
The measure steps bracket the compression so the report, the waterfall and the Pareto plot
have a before and an after.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from modules.errors import BadInputError

# Fewer timed runs than the measure step's default: a first look in seconds, wider CIs.
QUICK_TIMING = {"runs": 5, "warmup": 1}


@dataclass(frozen=True)
class Preset:
    """A named pipeline and the model frameworks it accepts."""

    name: str
    summary: str
    frameworks: tuple[str, ...]
    steps: tuple[tuple[str, dict[str, Any]], ...]

    def step_calls(self) -> list[dict[str, Any]]:
        """The steps as job-spec dicts ({name, params})."""
        return [{"name": name, "params": dict(params)} for name, params in self.steps]


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            name="measure",
            summary="Measure size, latency (95% CI) and accuracy; write the report.",
            frameworks=("torch", "sklearn", "onnx"),
            steps=(("measure", {}), ("report", {})),
        ),
        Preset(
            name="quick-prune",
            summary="Prune half the neurons, 1 epoch of fine-tuning, quick timing (wide CIs).",
            frameworks=("torch",),
            steps=(
                ("measure", QUICK_TIMING),
                ("prune_structured", {"amount": 0.5, "finetune_epochs": 1}),
                ("measure", QUICK_TIMING),
                ("report", {}),
            ),
        ),
        Preset(
            name="prune-onnx-int8",
            summary="Prune 50% + fine-tune, export to ONNX, int8-quantize, parity gate.",
            frameworks=("torch",),
            steps=(
                ("measure", {}),
                ("prune_structured", {"amount": 0.5, "finetune_epochs": 3}),
                ("onnx_export", {}),
                ("onnx_quantize", {}),
                ("measure", {}),
                ("onnx_parity", {}),
                ("report", {}),
            ),
        ),
        Preset(
            name="prune-sweep",
            summary="Prune at 25/50/75% (1 epoch of fine-tuning each): the trade-off curve.",
            frameworks=("torch",),
            steps=(
                (
                    "sweep",
                    {
                        "step": "prune_structured",
                        "param": "amount",
                        "values": [0.25, 0.5, 0.75],
                        "base_params": {"finetune_epochs": 1},
                    },
                ),
                ("report", {}),
            ),
        ),
        Preset(
            name="compress-to-budget",
            summary="Compress to budget: search chains (distil, prune, low-rank, int8) for the "
            "smallest parity-gated ONNX that fits the profile within 1 pt of accuracy.",
            frameworks=("torch", "sklearn"),
            steps=(("compress", {"max_drop": 1.0}),),
        ),
        Preset(
            name="onnx-parity",
            summary="Export to ONNX, measure it and check it agrees with the original.",
            frameworks=("torch", "sklearn"),
            steps=(
                ("measure", {}),
                ("onnx_export", {}),
                ("measure", {}),
                ("onnx_parity", {}),
                ("report", {}),
            ),
        ),
    )
}


def get_preset(name: str, *, framework: str | None = None) -> Preset:
    """The preset called `name`; BadInputError if unknown or it does not take `framework`."""
    preset = PRESETS.get(name)
    if preset is None:
        raise BadInputError(f"unknown preset {name!r}; one of {', '.join(PRESETS)}")
    if framework is not None and framework not in preset.frameworks:
        raise BadInputError(
            f"preset {name!r} takes {'/'.join(preset.frameworks)} models, not {framework}"
        )
    return preset
