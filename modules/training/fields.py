"""The params fields shared by the steps that train a torch model, written once.

No torch import: the params models are built wherever steps are listed.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class TrainingFields(BaseModel):
    """The `fit` settings every step that trains a torch model takes: lr and batch_size."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    lr: float = Field(default=1e-3, gt=0, le=1.0, description="Learning rate (Adam).")
    batch_size: int = Field(default=64, ge=1, le=65536, description="Training batch size.")


def finetune_epochs_field(default: int) -> Any:
    """The `finetune_epochs` field; its bounds are shared, its default is the technique's."""
    return Field(
        default=default,
        ge=0,
        le=500,
        description="Fine-tuning epochs after compressing (0 = none; gradual pruning: with "
        "the final mask fixed).",
    )


class FineTuneFields(TrainingFields):
    """The fine-tuning params of a compression step: epochs, lr, lr_schedule, batch_size."""

    finetune_epochs: int = finetune_epochs_field(5)
    lr_schedule: Literal["constant", "cosine"] = Field(
        default="cosine",
        description="Fine-tuning learning rate: cosine (decayed per optimizer step from `lr` "
        "to 0 at the last step; the default: it recovered more accuracy after structured "
        "pruning in benchmarks/results/byo_torch.md), or constant `lr`.",
    )
