"""One scaffold for the torch steps: copy, transform, fine-tune, then compare before and after.

Like torchao's `quantize_(model, config)` around its per-module handlers: a technique is a
pure `transform(module, data, params, ctx) -> Transformed` and `torch_step` does the rest,
the same way for every technique, with one set of metric names (see `compare`). Sizes are
the state_dict's tensor bytes, counted without serializing: run_step already records the
stored files' sizes as the step record's input_size and output_size.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from modules.core.artifact import ModelArtifact
from modules.core.step import StepContext, StepOutput
from modules.evaluation.measure import count_params
from modules.storage.datasets import Dataset
from modules.storage.graph_layers import lift_layers
from modules.storage.inputs import dataset_for_model, torch_input_specs
from modules.training.finetune import (
    LossFn,
    LrSchedule,
    check_fits_data,
    check_trainable,
    eval_mode,
    fit,
    forward,
    seed_everything,
)

SIZE_METHOD = (
    "state_dict tensor bytes (the stored file adds a small header; its size is the step "
    "record's input_size / output_size)"
)


class FineTuneParams(Protocol):
    """The fine-tuning fields a fine-tuning step's params carry."""

    @property
    def finetune_epochs(self) -> int: ...

    @property
    def lr(self) -> float: ...

    @property
    def lr_schedule(self) -> LrSchedule: ...

    @property
    def batch_size(self) -> int: ...


@dataclass
class Transformed:
    """What a transform hands back to torch_step.

    after_step: runs after every fine-tuning optimizer step (unstructured pruning puts its
        masks back, since Adam moves pruned weights off zero).
    loss_fn: the fine-tune's loss (fit's LossFn; structured pruning distills from the
        unpruned input with it); None = cross-entropy on the labels.
    trained: the transform trained the module itself (gradual pruning): no fine-tune follows.
    meta: facts added to the output artifact's meta.
    """

    module: nn.Module
    metrics: dict[str, Any] = field(default_factory=dict)
    after_step: Callable[[int], None] | None = None
    loss_fn: LossFn | None = None
    trained: bool = False
    meta: dict[str, Any] = field(default_factory=dict)


# (a copy of the input module, data, params, ctx) -> Transformed; free to change the copy.
Transform = Callable[[nn.Module, Dataset, Any, StepContext], Transformed]


def state_dict_bytes(module: nn.Module) -> int:
    """Bytes of the module's tensors: what its stored file holds, less the header."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def logits(module: nn.Module, x: np.ndarray) -> torch.Tensor:
    """float32 logits of `module` on flat features (float16 layers emit half precision)."""
    eval_mode(module)
    with torch.inference_mode():
        return forward(module, x).float()


def compare(before: nn.Module, after: nn.Module, data: Dataset) -> dict[str, Any]:
    """Accuracy, agreement, parameters and tensor bytes of a step's input and output models.

    Both must emit one logit per class; `label_agreement` and `max_abs_logit_diff` compare
    them on the test split.
    """
    old, new = logits(before, data.X_test), logits(after, data.X_test)
    acc_before = float((old.argmax(1).numpy() == data.y_test).mean())
    acc_after = float((new.argmax(1).numpy() == data.y_test).mean())
    params_before, _ = count_params(ModelArtifact("torch", before))
    params_after, nonzero_after = count_params(ModelArtifact("torch", after))
    size_before, size_after = state_dict_bytes(before), state_dict_bytes(after)
    return {
        "accuracy_before": acc_before,
        "accuracy": acc_after,
        "accuracy_drop_pt": 100 * (acc_before - acc_after),
        "label_agreement": float((old.argmax(1) == new.argmax(1)).float().mean()),
        "max_abs_logit_diff": float((old - new).abs().max()),
        "params_before": params_before,
        "params_after": params_after,
        "nonzero_params_after": nonzero_after,
        "size_before_bytes": size_before,
        "size_after_bytes": size_after,
        "size_ratio": size_before / size_after if size_after else None,
        "size_method": SIZE_METHOD,
    }


def torch_step(
    model: ModelArtifact,
    data: Dataset,
    params: Any,
    ctx: StepContext,
    *,
    name: str,
    transform: Transform,
    fine_tune: bool = True,
) -> StepOutput:
    """Transform a copy of the input, fine-tune it when the params ask, compare with the input.

    name: the step's name, for error messages.
    fine_tune: the step fine-tunes, so `params` is a FineTuneParams: the input must be a
        trainable float32 model, and `params.finetune_epochs` > 0 trains the transformed copy
        (unless the transform trained it itself).
    """
    if fine_tune:
        check_trainable(model.obj, step=name)
    data = dataset_for_model(data, torch_input_specs(model.meta))
    check_fits_data(model.obj, data.X_test, num_classes=data.n_classes, what="the input model")
    seed_everything(ctx.seed)
    # An exported program's layer calls become layer modules the techniques can change.
    done = transform(copy.deepcopy(lift_layers(model.obj)), data, params, ctx)
    module = done.module
    check_fits_data(module, data.X_test, num_classes=data.n_classes, what=f"the {name} output")
    metrics = dict(done.metrics)
    tuning: FineTuneParams = params
    if fine_tune and not done.trained and tuning.finetune_epochs:
        metrics["accuracy_after_transform"] = float(
            (logits(module, data.X_test).argmax(1).numpy() == data.y_test).mean()
        )
        history = fit(
            module,
            data.X_train,
            data.y_train,
            epochs=tuning.finetune_epochs,
            lr=tuning.lr,
            lr_schedule=tuning.lr_schedule,
            batch_size=tuning.batch_size,
            seed=ctx.seed,
            loss_fn=done.loss_fn,
            after_step=done.after_step,
        )
        metrics["finetune"] = {
            "epochs": tuning.finetune_epochs,
            "lr_schedule": tuning.lr_schedule,
            "final_loss": history["final_loss"],
            "train_time_s": history["train_time_s"],
        }
    metrics.update(compare(model.obj, module, data))
    # A model with declared inputs (meta["inputs"], e.g. a .pt2 upload) keeps them and its
    # format; a flat zoo model records its width.
    width = {} if model.meta.get("inputs") else {"in_features": data.n_features}
    meta = {**model.meta, **width, "num_classes": data.n_classes, **done.meta}
    return StepOutput(model=ModelArtifact("torch", eval_mode(module), meta), metrics=metrics)
