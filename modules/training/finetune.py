"""The one training loop, shared by train, prune, low-rank and distill; deterministic."""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from modules.core.step import check_cancelled
from modules.errors import BadInputError, IncompatibleError

LossFn = Callable[[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor], torch.Tensor]
LrSchedule = Literal["constant", "cosine"]


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def eval_mode(model: nn.Module) -> nn.Module:
    """`model` in eval mode; an exported program's module (its mode fixed in the graph) as is."""
    # ExportedProgram.module() refuses eval() and train().
    with contextlib.suppress(NotImplementedError):
        model.eval()
    return model


def as_tensors(x: np.ndarray) -> tuple[torch.Tensor, ...]:
    """A dataset's X as a model's positional inputs: one tensor, or one per named field.

    A single array is float32 (integer arrays, e.g. token ids, stay int64); a structured
    array (several named inputs) gives its fields in order, each with its own dtype.
    """
    if x.dtype.names:
        return tuple(torch.from_numpy(np.ascontiguousarray(x[name])) for name in x.dtype.names)
    dtype = np.int64 if x.dtype.kind in "iu" else np.float32
    return (torch.from_numpy(np.ascontiguousarray(x, dtype=dtype)),)


def forward(model: nn.Module, x: np.ndarray) -> torch.Tensor:
    """`model` on a dataset's X (any shape, or several named inputs)."""
    return model(*as_tensors(x))


def fit(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 64,
    seed: int = 0,
    weight_decay: float = 0.0,
    lr_schedule: LrSchedule = "constant",
    loss_fn: LossFn | None = None,
    after_step: Callable[[int], None] | None = None,
    before_epoch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train with Adam on (x, y); returns loss history and wall time.

    lr_schedule: constant `lr`, or cosine: `lr` decayed per optimizer step to 0 at the end.
    loss_fn(logits, inputs, yb): inputs is the batch's tuple of model inputs; defaults to
        cross-entropy; distillation passes its own.
    after_step(global_step): runs after every optimizer step (pruning masks, schedules).
    before_epoch(epoch): runs before each epoch (temperature / alpha schedules).
    """
    seed_everything(seed)
    xts = as_tensors(x)
    yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    total_steps = epochs * math.ceil(len(yt) / batch_size)
    ce = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    step = 0
    start = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        check_cancelled()
        if before_epoch is not None:
            before_epoch(epoch)
        order = torch.randperm(len(yt), generator=generator)
        total, count = 0.0, 0
        for i in range(0, len(yt), batch_size):
            idx = order[i : i + batch_size]
            xbs, yb = tuple(t[idx] for t in xts), yt[idx]
            optimizer.zero_grad(set_to_none=True)
            logits = model(*xbs)
            loss = loss_fn(logits, xbs, yb) if loss_fn is not None else ce(logits, yb)
            loss.backward()
            optimizer.step()
            step += 1
            if lr_schedule == "cosine":
                for group in optimizer.param_groups:
                    group["lr"] = cosine_lr(step, total=total_steps, lr=lr)
            if after_step is not None:
                after_step(step)
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        losses.append(total / max(count, 1))
    model.eval()
    return {
        "epochs": epochs,
        "steps": step,
        "final_loss": losses[-1] if losses else None,
        "loss_history": losses,
        "train_time_s": time.perf_counter() - start,
    }


def cosine_lr(step: int, *, total: int, lr: float) -> float:
    """The learning rate after `step` of `total` optimizer steps: lr/2 * (1 + cos(pi t/T))."""
    return 0.5 * lr * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of a torch classifier on flat features."""
    eval_mode(model)
    with torch.inference_mode():
        logits = forward(model, x)
    return float((logits.argmax(dim=1).numpy() == y).mean())


def check_trainable(model: nn.Module, *, step: str) -> None:
    """Refuse a model that fine-tuning cannot train: quantized layers or non-float32 weights."""
    from modules.storage.layers import Float16Linear, Int8Linear

    for name, sub in model.named_modules():
        if isinstance(sub, Int8Linear | Float16Linear):
            raise BadInputError(
                f"{step}: layer {name or 'model'} is a {type(sub).__name__} (already quantized); "
                f"run {step} before quantize_dynamic"
            )
    for name, param in model.named_parameters():
        if param.dtype != torch.float32:
            raise BadInputError(
                f"{step}: parameter {name} is {param.dtype}; {step} fine-tunes float32 models only"
            )


def check_fits_data(model: nn.Module, x: np.ndarray, *, num_classes: int, what: str) -> None:
    """Run two rows through `model`; an IncompatibleError names expected and actual shapes."""
    eval_mode(model)
    try:
        with torch.no_grad():
            out = forward(model, x[:2])
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        given = (
            ", ".join(x.dtype.names) if x.dtype.names else f"samples of shape {list(x.shape[1:])}"
        )
        text = " ".join(str(exc).split())[:300]
        raise IncompatibleError(f"{what} does not accept the data's {given}: {text}") from None
    if out.ndim != 2 or out.shape[1] != num_classes:
        raise IncompatibleError(
            f"{what} outputs shape {tuple(out.shape[1:])} per row, but the data has "
            f"{num_classes} classes"
        )
