"""Knowledge distillation: train a small student on a teacher's softened outputs.

loss = alpha * T**2 * KL(p_teacher || p_student) + (1 - alpha) * CE(student, labels), with
p = softmax(logits / T). The KL runs from teacher to student (torch's
`kl_div(log p_student, p_teacher)`, Hinton et al.); T**2 keeps the soft term's gradients
on the scale of the hard term's. Temperature and alpha may fall linearly per epoch (high
to low). The teacher is the step's input model; the student is a zoo arch (its
in_features/num_classes come from the dataset) or a stored model of the same user (its
arch and initial weights), named by `student_key`.

CLI: python -m modules.compression.distill --teacher teacher.pt --student student.pt
     --output distilled.pt [--temperature 4 --alpha 0.7 --epochs N]
     (or --student-arch '{"name": "mlp", "hidden": [64]}' instead of --student)
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ConfigDict, Field, field_validator, model_validator
from torch import nn

from modules.compression.scaffold import compare
from modules.core.artifact import ModelArtifact
from modules.core.registry import register_step
from modules.core.step import StepContext, StepOutput
from modules.errors import BadInputError, IncompatibleError
from modules.evaluation.inference import make_predictor
from modules.evaluation.measure import batch_of, thread_count, time_batches
from modules.evaluation.stats import compare_latency
from modules.storage.architectures import build_model, complete_arch
from modules.storage.datasets import Dataset
from modules.storage.graph_layers import lift_layers
from modules.storage.inputs import dataset_for_model, torch_input_specs
from modules.storage.keys import key_in_user, validate_key
from modules.storage.model_formats import save_model, torch_io_dims
from modules.training.fields import TrainingFields
from modules.training.finetune import (
    accuracy,
    as_tensors,
    check_fits_data,
    check_trainable,
    eval_mode,
    fit,
    seed_everything,
)
from modules.training.kd import kd_loss

DEFAULT_STUDENT: dict[str, Any] = {"name": "mlp", "hidden": [64]}


def linear_schedule(epoch: int, *, epochs: int, start: float, end: float | None) -> float:
    """`start` at epoch 0 moving linearly to `end` at the last epoch (constant if end is None)."""
    if end is None or epochs <= 1:
        return start
    return start + (end - start) * epoch / (epochs - 1)


def distill(
    teacher: nn.Module,
    student: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    temperature: float = 4.0,
    alpha: float = 0.7,
    temperature_final: float | None = None,
    alpha_final: float | None = None,
    epochs: int = 20,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
) -> tuple[nn.Module, dict[str, Any]]:
    """A trained copy of `student`, taught by `teacher` (left unchanged) on (x, y)."""
    student = copy.deepcopy(student)
    eval_mode(teacher)
    current = {"temperature": temperature, "alpha": alpha}
    used: list[dict[str, float]] = []

    def before_epoch(epoch: int) -> None:
        current["temperature"] = linear_schedule(
            epoch, epochs=epochs, start=temperature, end=temperature_final
        )
        current["alpha"] = linear_schedule(epoch, epochs=epochs, start=alpha, end=alpha_final)
        used.append(dict(current))

    def loss_fn(
        logits: torch.Tensor, inputs: tuple[torch.Tensor, ...], yb: torch.Tensor
    ) -> torch.Tensor:
        # no_grad, not inference_mode: kl_div saves the teacher's output for backward.
        with torch.no_grad():
            teacher_logits = teacher(*inputs).float()
        return kd_loss(
            logits,
            teacher_logits,
            yb,
            temperature=current["temperature"],
            alpha=current["alpha"],
        )

    history = fit(
        student,
        x,
        y,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        loss_fn=loss_fn,
        before_epoch=before_epoch,
    )
    return student, {**history, "schedule": used}


class DistillParams(TrainingFields):
    """Params of the `distill` step."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    student_arch: dict[str, Any] | None = Field(
        default=None,
        description="Student zoo arch, e.g. {'name': 'mlp', 'hidden': [64]}; in_features and "
        "num_classes come from the dataset. Default: that MLP, unless student_key is set.",
    )
    student_key: str | None = Field(
        default=None,
        max_length=1024,
        description="Store key (users/{you}/...) of a torch model to use as the student, with "
        "its weights as the starting point; instead of student_arch.",
    )
    student_prune: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="Student = a copy of the teacher with this share of its neurons and "
        "channels removed (structured pruning); instead of student_arch or student_key.",
    )
    temperature: float = Field(default=4.0, gt=0, le=100, description="Softmax temperature T.")
    temperature_final: float | None = Field(
        default=None,
        gt=0,
        le=100,
        description="If set, T falls linearly to this by the last epoch (at most temperature).",
    )
    alpha: float = Field(default=0.7, ge=0, le=1, description="Weight of the soft (KD) loss.")
    alpha_final: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="If set, alpha falls linearly to this by the last epoch (at most alpha).",
    )
    epochs: int = Field(default=20, ge=1, le=1000, description="Training epochs.")
    timing_runs: int = Field(
        default=20,
        ge=2,
        le=10_000,
        description="Minimum timed runs per batch size for the latency report.",
    )

    @field_validator("student_key")
    @classmethod
    def _check_key(cls, value: str | None) -> str | None:
        return None if value is None else validate_key(value)

    @model_validator(mode="after")
    def _check_combination(self) -> DistillParams:
        if self.student_arch is not None and self.student_key is not None:
            raise ValueError("give student_arch or student_key, not both")
        if self.student_prune is not None and (self.student_arch or self.student_key):
            raise ValueError(
                "student_prune makes the student from the teacher; give it without "
                "student_arch or student_key"
            )
        if self.temperature_final is not None and self.temperature_final > self.temperature:
            raise ValueError(
                f"temperature_final {self.temperature_final} is above temperature "
                f"{self.temperature}; the schedule runs from high to low"
            )
        if self.alpha_final is not None and self.alpha_final > self.alpha:
            raise ValueError(
                f"alpha_final {self.alpha_final} is above alpha {self.alpha}; the schedule "
                "runs from high to low"
            )
        return self


def _student(
    params: DistillParams, data: Dataset, ctx: StepContext, *, teacher: nn.Module
) -> nn.Module:
    if params.student_prune is not None:
        from modules.compression.prune_structured import prune_structured

        return prune_structured(
            lift_layers(teacher),
            amount=params.student_prune,
            in_features=data.n_features,
            example_inputs=as_tensors(data.X_train[:4]),
        )
    if params.student_key is None:
        if data.input_names:
            raise IncompatibleError(
                f"a zoo student takes one float array, but the teacher takes the inputs "
                f"{', '.join(data.input_names)}; give student_prune (a pruned copy of the "
                "teacher) or student_key (an uploaded model)"
            )
        given = params.student_arch or DEFAULT_STUDENT
        teacher_dims = {"in_features": data.n_features, "num_classes": data.n_classes}
        for key, value in teacher_dims.items():
            if key in given and given[key] != value:
                raise IncompatibleError(
                    f"student_arch sets {key}={given[key]!r} but the teacher has {key}={value}"
                )
        arch = complete_arch(
            given,
            in_features=data.n_features,
            num_classes=data.n_classes,
            image_shape=data.image_shape,
        )
        seed_everything(ctx.seed)
        zoo = build_model(arch)
        # Zoo archs take flat rows; a student of images or other N-D samples flattens first.
        return nn.Sequential(nn.Flatten(), zoo) if len(data.sample_shape) > 1 else zoo
    if not key_in_user(params.student_key, ctx.user_id):
        raise BadInputError(
            f"student_key {params.student_key!r} is not under users/{ctx.user_id}/; a student "
            "must belong to the job's user"
        )
    if ctx.load_model is None:
        raise BadInputError("student_key needs a model store, and this run has none")
    artifact = ctx.load_model(params.student_key)
    if artifact.framework != "torch":
        raise IncompatibleError(
            f"student_key {params.student_key!r} holds a {artifact.framework} model; the "
            "student must be a torch model"
        )
    return copy.deepcopy(artifact.obj)


def check_student_fits(student: nn.Module, teacher: nn.Module, *, x: np.ndarray) -> None:
    """IncompatibleError naming both sides when the student's input or output differs."""
    student_in = torch_io_dims(student).get("in_features")
    if student_in is not None and not x.dtype.names and student_in != x[0].size:
        given = x.shape[1] if x.ndim == 2 else f"samples of shape {list(x.shape[1:])}"
        raise IncompatibleError(
            f"the student takes {student_in} input features but the teacher takes {given}"
        )
    sample = as_tensors(x[:2])
    with torch.no_grad():
        teacher_out = eval_mode(teacher)(*sample)
        try:
            student_out = eval_mode(student)(*sample)
        except RuntimeError as exc:
            raise IncompatibleError(
                f"the student does not accept the teacher's {x.shape[1]} input features: {exc}"
            ) from None
    if tuple(student_out.shape[1:]) != tuple(teacher_out.shape[1:]):
        raise IncompatibleError(
            f"the student outputs {list(student_out.shape[1:])} per row but the teacher "
            f"outputs {list(teacher_out.shape[1:])}"
        )


def _latency(artifact: ModelArtifact, data: Dataset, runs: int) -> dict[str, Any]:
    predictor = make_predictor(artifact)
    latency: dict[str, Any] = {}
    for size in (1, 64):
        stat, _ = time_batches(predictor.scores, batch_of(data.X_test, size), warmup=3, runs=runs)
        latency[f"b{size}"] = stat | {"threads": thread_count("torch")}
    return latency


@register_step("distill", params=DistillParams, accepts={"torch"})
def distill_step(
    model: ModelArtifact, data: Dataset, params: DistillParams, ctx: StepContext
) -> StepOutput:
    """Distill the input (teacher) model into a smaller student; compare the two."""
    teacher = model.obj
    data = dataset_for_model(data, torch_input_specs(model.meta))
    check_fits_data(teacher, data.X_test, num_classes=data.n_classes, what="the teacher")
    student = _student(params, data, ctx, teacher=teacher)
    check_trainable(student, step="distill")
    check_student_fits(student, teacher, x=data.X_test)
    start_accuracy = accuracy(student, data.X_test, data.y_test)
    trained, history = distill(
        teacher,
        student,
        data.X_train,
        data.y_train,
        temperature=params.temperature,
        alpha=params.alpha,
        temperature_final=params.temperature_final,
        alpha_final=params.alpha_final,
        epochs=params.epochs,
        lr=params.lr,
        batch_size=params.batch_size,
        seed=ctx.seed,
    )
    meta: dict[str, Any] = {"in_features": data.n_features, "num_classes": data.n_classes}
    if model.meta.get("inputs"):
        # The student takes the teacher's inputs: it keeps their names, shapes and format.
        meta = {
            "format": model.meta.get("format"),
            "inputs": model.meta["inputs"],
            "num_classes": data.n_classes,
        }
    out = ModelArtifact("torch", eval_mode(trained), meta)
    source = ModelArtifact("torch", teacher, {**model.meta, **meta})
    # Teacher and student in the scaffold's before/after names (accuracy, params, tensor bytes).
    compared = compare(teacher, trained, data)
    # size_bytes is each stored file's size: the distill script's users compare it with the file.
    teacher_report = {
        "accuracy": compared["accuracy_before"],
        "size_bytes": len(save_model(source)),
        "params": compared["params_before"],
        "latency_ms": _latency(source, data, params.timing_runs),
    }
    student_report = {
        "accuracy": compared["accuracy"],
        "size_bytes": len(save_model(out)),
        "params": compared["params_after"],
        "latency_ms": _latency(out, data, params.timing_runs),
    }
    # A speedup only where the two median CIs do not overlap; else None and a note.
    speedup = compare_latency(
        teacher_report["latency_ms"]["b64"], student_report["latency_ms"]["b64"]
    )
    metrics = {
        "teacher": teacher_report,
        "student": student_report,
        "student_accuracy_before": start_accuracy,
        **compared,
        "speedup_b64": speedup["ratio"],
        **({} if speedup["measurable"] else {"speedup_b64_note": speedup["note"]}),
        "schedule": history["schedule"],
        "final_loss": history["final_loss"],
        "train_time_s": history["train_time_s"],
    }
    return StepOutput(model=out, metrics=metrics)


# --- CLI -------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: distill through run_step and print one JSON line of metrics."""
    from modules.pipeline.local import LocalWorkspace
    from modules.pipeline.script import FileOption, ScriptOptions, script_main

    def stage_student(workspace: Path, path: Path, trust_pickle: bool) -> str:
        # Into the store the step reads, through the safe loaders; passed by key.
        ws = LocalWorkspace(workspace)
        return ws.import_model(path, user_id="local", trust_pickle=trust_pickle)

    # The issue fixes these option names: --teacher, --student, --output.
    student = FileOption(
        "--student",
        stage_student,
        "Student model file (arch + initial weights); instead of --student-arch.",
    )
    options = ScriptOptions(
        aliases={"input_model": ["--teacher"], "output_model": ["--output"]},
        files={"student_key": student},
    )
    return script_main("distill", argv, options)


if __name__ == "__main__":
    raise SystemExit(main())
