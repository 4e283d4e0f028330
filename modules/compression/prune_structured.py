"""Pruning that shrinks what users care about: structured, unstructured and gradual.

structured    Torch-Pruning's dependency graph removes whole neurons (Linear) and channels
              (Conv2d), slicing the BatchNorm, the next layer and residual adds to match, so
              the saved tensors are smaller and inference is faster. Importance: L1 or L2 norm.
              A user's own model (meta["inputs"]: any nn.Module, or a .pt2 program, whose
              layer calls graph_layers.lift_layers turns back into layer modules) is traced
              on rows of the dataset, so adds, concatenations and norms of any layout couple
              the channels they join; a graph that hard-codes a pruned size (a reshape to a
              literal width) is refused, naming the error. An exported graph with attention
              goes to transformer_prune instead: the hidden neurons of its FFN/MLP layers
              are removed, every other layer is kept, and the record says why.
unstructured  magnitude (or |weight x gradient|) masks, layer-wise or global, multiplied into
              the weights: no pruning hooks are left. The file stays dense, so the metrics
              also give a CSR estimate and the DEFLATE-compressed size, each labelled.
gradual       Zhu & Gupta (2017): s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))**3,
              masks recomputed every `frequency` optimizer steps while fine-tuning, then
              fine-tuning with the final mask fixed.

CLI: python -m modules.compression.prune_structured --input-model in.pt --output-model out.pt
     --amount 0.5 [--method structured|unstructured|gradual] [--dataset digits]
"""

from __future__ import annotations

import copy
import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from pydantic import ConfigDict, Field, model_validator
from torch import nn

from modules.compression.layer_select import (
    LayerChoice,
    LayerControlFields,
    check_layer_settings,
    describe_choices,
    layers_field,
    number_in,
    resolve_layers,
)
from modules.compression.scaffold import Transformed, torch_step
from modules.compression.transformer_prune import (
    ffn_layer_report,
    graph_has_attention,
    plan_ffn_pruning,
    prune_ffn,
)
from modules.core.artifact import ModelArtifact
from modules.core.registry import register_step
from modules.core.step import StepContext, StepOutput
from modules.errors import BadInputError
from modules.storage.datasets import Dataset
from modules.storage.graph_layers import lift_layers
from modules.storage.layers import ResidualBlock
from modules.training.fields import FineTuneFields
from modules.training.finetune import LossFn, LrSchedule, as_tensors, fit
from modules.training.kd import teacher_loss

Importance = Literal["l1", "l2", "gradient"]
Scope = Literal["layer", "global"]

# Leaf types Torch-Pruning's dependency graph handles in the shapes the zoo builds.
_STRUCTURED_LEAVES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv2d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.LayerNorm,
    nn.ReLU,
    nn.GELU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Dropout,
    nn.Flatten,
    nn.Unflatten,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Identity,
)
_CONTAINERS: tuple[type[nn.Module], ...] = (nn.Sequential, ResidualBlock)


# --- shared pieces ---------------------------------------------------------------------------


def prunable_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weight tensors unstructured pruning masks: every Linear and Conv2d weight."""
    return {
        f"{name}.weight" if name else "weight": sub.weight
        for name, sub in model.named_modules()
        if isinstance(sub, nn.Linear | nn.Conv2d)
    }


def weight_sparsity(model: nn.Module) -> float:
    """Fraction of zeros over the prunable (Linear and Conv2d) weights."""
    weights = list(prunable_weights(model).values())
    total = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / total if total else 0.0


def _classifier(model: nn.Module) -> nn.Module:
    """The layer that emits the logits: the last Linear or Conv2d in module order."""
    layers = [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    if not layers:
        raise BadInputError("the model has no Linear or Conv2d layer to prune")
    return layers[-1]


def classifier_name(model: nn.Module) -> str:
    """The module name of the layer that emits the logits (the last Linear or Conv2d)."""
    logits = _classifier(model)
    return next(n for n, m in model.named_modules() if m is logits)


# --- structured ------------------------------------------------------------------------------


# Layers with weights that Torch-Pruning slices in a user's own model (any container).
_OWN_MODEL_WEIGHTED: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv2d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.LayerNorm,
    nn.Embedding,
    nn.MultiheadAttention,
)


def check_own_model_support(model: nn.Module) -> None:
    """Raise a BadInputError naming the first module with weights Torch-Pruning cannot slice."""
    for name, sub in model.named_modules():
        if isinstance(sub, _OWN_MODEL_WEIGHTED):
            continue
        inside = any(
            (name + ".").startswith(other + ".")
            for other, m in model.named_modules()
            if isinstance(m, nn.MultiheadAttention) and other != name
        )
        if list(sub.parameters(recurse=False)) and not inside:
            raise BadInputError(
                f"structured pruning cannot handle layer {name or 'model'} "
                f"({type(sub).__name__}): it holds weights directly; layers with weights must "
                f"be {', '.join(t.__name__ for t in _OWN_MODEL_WEIGHTED)}"
            )


def check_structured_support(model: nn.Module) -> None:
    """Raise a BadInputError naming the first layer structured pruning cannot handle."""
    seen_weights = False
    for name, sub in model.named_modules():
        where = name or "model"
        if isinstance(sub, _CONTAINERS):
            continue
        if type(sub) not in _STRUCTURED_LEAVES:
            raise BadInputError(
                f"structured pruning cannot handle layer {where} ({type(sub).__name__}); it "
                f"handles {', '.join(t.__name__ for t in _STRUCTURED_LEAVES)} in Sequential "
                "or ResidualBlock containers (prune before quantize_dynamic)"
            )
        if isinstance(sub, nn.Conv2d) and sub.groups != 1 and sub.groups != sub.in_channels:
            raise BadInputError(
                f"structured pruning cannot handle layer {where}: a grouped Conv2d "
                f"(groups={sub.groups}); only groups=1 and depthwise convolutions are supported"
            )
        if isinstance(sub, nn.LayerNorm) and len(sub.normalized_shape) != 1:
            raise BadInputError(
                f"structured pruning cannot handle layer {where}: a LayerNorm over "
                f"{list(sub.normalized_shape)} (only one normalized dimension is supported)"
            )
        if isinstance(sub, nn.Unflatten) and seen_weights:
            raise BadInputError(
                f"structured pruning cannot handle layer {where}: an Unflatten after weighted "
                "layers (channels cannot be traced through the reshape)"
            )
        seen_weights = seen_weights or isinstance(sub, nn.Linear | nn.Conv2d)


def _widths(model: nn.Module) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, sub in model.named_modules():
        if isinstance(sub, nn.Linear):
            out[name] = sub.out_features
        elif isinstance(sub, nn.Conv2d):
            out[name] = sub.out_channels
    return out


def prune_structured(
    model: nn.Module,
    *,
    amount: float,
    in_features: int,
    importance: Literal["l1", "l2"] = "l1",
    scope: Scope = "layer",
    round_to: int = 1,
    layers: Mapping[str, Any] | None = None,
    example_inputs: tuple[torch.Tensor, ...] | None = None,
) -> nn.Module:
    """A copy of `model` with `amount` of each layer's neurons/channels physically removed.

    layers: per-layer control (see layer_select): a layer's own {"amount": a} or "skip"
    (its outputs are kept; its inputs still follow the layer before it). Layers coupled by a
    residual add are pruned as one group and take the first group member's setting.
    example_inputs: rows the model is traced on, for a user's own model (any layout, any
        inputs); None = a zoo model, traced on zeros of shape (2, in_features).
    """
    import torch_pruning as tp

    if not 0 <= amount < 1:
        raise BadInputError(f"amount must be in [0, 1), got {amount}")
    if example_inputs is None:
        check_structured_support(model)
    else:
        model = lift_layers(model)
        if graph_has_attention(model):
            return _prune_attention_graph(
                model,
                amount=amount,
                example_inputs=example_inputs,
                importance=importance,
                scope=scope,
                round_to=round_to,
                layers=layers or {},
            )
        check_own_model_support(model)
    pruned = copy.deepcopy(model).eval()
    modules = dict(pruned.named_modules())
    classifier = _classifier(pruned)
    overrides = structured_layer_amounts(pruned, layers or {})
    if amount == 0 and not any(overrides.values()):
        return pruned
    traced = example_inputs if example_inputs is not None else (torch.zeros(2, in_features),)
    with torch.no_grad():
        expected = pruned(*traced).shape
    pruner = tp.pruner.BasePruner(
        pruned,
        traced,
        importance=tp.importance.MagnitudeImportance(p=1 if importance == "l1" else 2),
        pruning_ratio=amount,
        pruning_ratio_dict={modules[n]: a for n, a in overrides.items() if a is not None},
        global_pruning=scope == "global",
        # The logits keep one output per class.
        ignored_layers=[classifier] + [modules[n] for n, a in overrides.items() if a is None],
        round_to=round_to if round_to > 1 else None,
    )
    try:
        pruner.step()
        with torch.no_grad():
            got = pruned(*traced).shape
    except (RuntimeError, ValueError, IndexError) as exc:
        text = " ".join(str(exc).split())[:300]
        raise BadInputError(
            "structured pruning broke the model's graph (it fixes a size that pruning changed, "
            f"e.g. a reshape to a literal width): {text}; use method 'unstructured', or skip "
            "the layers that feed it (`layers`)"
        ) from None
    if got != expected:
        raise BadInputError(
            f"structured pruning changed the output shape from {list(expected)} to {list(got)}"
        )
    return pruned


def _prune_attention_graph(
    model: nn.Module,
    *,
    amount: float,
    example_inputs: tuple[torch.Tensor, ...],
    importance: Literal["l1", "l2"],
    scope: Scope,
    round_to: int,
    layers: Mapping[str, Any],
) -> nn.Module:
    # Exported attention reshapes q/k/v to literal head widths: only the FFN neurons go.
    pruned = copy.deepcopy(model).eval()
    overrides = structured_layer_amounts(pruned, layers)
    if amount == 0 and not any(overrides.values()):
        return pruned
    out, _ = prune_ffn(
        pruned,  # type: ignore[arg-type]  # graph_has_attention: a GraphModule
        amount=amount,
        example_inputs=example_inputs,
        classifier=classifier_name(pruned),
        importance=importance,
        scope=scope,
        round_to=round_to,
        overrides=overrides,
    )
    return out


def structured_layer_report(
    model: nn.Module, pruned: nn.Module, layers: Mapping[str, Any]
) -> dict[str, Any]:
    """Which layers structured pruning of a graph with attention pruned and kept, and why."""
    if not graph_has_attention(model):
        return {}
    skipped = frozenset(n for n, a in structured_layer_amounts(model, layers).items() if a is None)
    plan = plan_ffn_pruning(
        model,  # type: ignore[arg-type]  # graph_has_attention: a GraphModule
        classifier=classifier_name(model),
        skipped=skipped,
    )
    return ffn_layer_report(plan, model, pruned)


PRUNE_LAYER_SETTINGS = {"amount": number_in(0, 1, hi_open=True)}


def layer_choices(model: nn.Module, layers: Mapping[str, Any]) -> dict[str, LayerChoice]:
    """Resolve a `layers` param against the model's Linear and Conv2d layers."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    if not layers:
        return {}
    checked = check_layer_settings(layers, allowed=PRUNE_LAYER_SETTINGS)
    return resolve_layers(checked, names, step="prune_structured")


def structured_layer_amounts(
    model: nn.Module, layers: Mapping[str, Any]
) -> dict[str, float | None]:
    """layer -> its own amount (None = skip) for structured pruning.

    The classifier's outputs are the classes, so it is never pruned: naming it exactly with
    an amount is an error, a wildcard that happens to match it leaves it alone.
    """
    classifier = classifier_name(model)
    out: dict[str, float | None] = {}
    for name, choice in layer_choices(model, layers).items():
        own = None if choice.setting is None else float(choice.setting["amount"])
        if name == classifier and own is not None:
            if choice.exact and own > 0:
                raise BadInputError(
                    f"prune_structured: layer {name!r} emits the logits (one output per class) "
                    'and cannot lose outputs; give it "skip" or leave it out of layers'
                )
            continue
        out[name] = own
    return out


def unstructured_layer_amounts(model: nn.Module, layers: Mapping[str, Any]) -> dict[str, float]:
    """weight name (as prunable_weights names it) -> that layer's own amount; skip = 0."""
    weights = {
        name: (f"{name}.weight" if name else "weight")
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear | nn.Conv2d)
    }
    return {
        weights[name]: 0.0 if c.setting is None else float(c.setting["amount"])
        for name, c in layer_choices(model, layers).items()
    }


# --- unstructured ----------------------------------------------------------------------------


def magnitude_masks(
    scores: dict[str, torch.Tensor], *, amount: float, scope: Scope
) -> dict[str, torch.Tensor]:
    """Boolean keep-masks that zero the `amount` lowest-scoring entries, per layer or globally.

    Exactly round(amount * n) entries are dropped (ties broken by position), so the
    measured sparsity equals the requested amount.
    """
    if not 0 <= amount < 1:
        raise BadInputError(f"amount must be in [0, 1), got {amount}")
    masks: dict[str, torch.Tensor] = {}
    if scope == "layer":
        for name, score in scores.items():
            masks[name] = _drop_lowest(score.flatten(), round(amount * score.numel())).view_as(
                score
            )
        return masks
    flat = torch.cat([s.flatten() for s in scores.values()])
    keep = _drop_lowest(flat, round(amount * flat.numel()))
    offset = 0
    for name, score in scores.items():
        masks[name] = keep[offset : offset + score.numel()].view_as(score)
        offset += score.numel()
    return masks


def masks_with_overrides(
    scores: dict[str, torch.Tensor],
    *,
    amount: float,
    scope: Scope,
    overrides: Mapping[str, float] | None = None,
) -> dict[str, torch.Tensor]:
    """magnitude_masks, except that the weights in `overrides` get their own layer amount.

    With scope "global" the other weights are still ranked together at `amount`.
    """
    if not overrides:
        return magnitude_masks(scores, amount=amount, scope=scope)
    rest = {n: s for n, s in scores.items() if n not in overrides}
    masks = magnitude_masks(rest, amount=amount, scope=scope) if rest else {}
    for name, own in overrides.items():
        masks.update(magnitude_masks({name: scores[name]}, amount=own, scope="layer"))
    return {name: masks[name] for name in scores}


def _drop_lowest(flat: torch.Tensor, k: int) -> torch.Tensor:
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    if k > 0:
        keep[torch.argsort(flat.detach().float(), stable=True)[:k]] = False
    return keep


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Multiply the masks into the weights in place (no reparametrisation hooks)."""
    weights = prunable_weights(model)
    with torch.no_grad():
        for name, mask in masks.items():
            weights[name].mul_(mask.to(weights[name].dtype))


def gradient_scores(
    model: nn.Module, x: np.ndarray, y: np.ndarray, *, batch_size: int = 256
) -> dict[str, torch.Tensor]:
    """First-order (Taylor) importance |w * dL/dw| summed over one pass of (x, y)."""
    weights = prunable_weights(model)
    scores = {name: torch.zeros_like(w) for name, w in weights.items()}
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    xts = as_tensors(x)
    yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
    model.eval()
    for i in range(0, len(yt), batch_size):
        model.zero_grad(set_to_none=True)
        batch = tuple(t[i : i + batch_size] for t in xts)
        loss_fn(model(*batch), yt[i : i + batch_size]).backward()
        for name, w in weights.items():
            if w.grad is not None:
                scores[name] += (w.detach() * w.grad).abs()
    model.zero_grad(set_to_none=True)
    return scores


def prune_unstructured(
    model: nn.Module,
    *,
    amount: float,
    scope: Scope = "layer",
    scores: dict[str, torch.Tensor] | None = None,
    layer_amounts: Mapping[str, float] | None = None,
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A copy of `model` with `amount` of its Linear/Conv2d weights set to zero, and the masks.

    scores: per-weight importance (default |w|; L1 and L2 rank single weights alike).
    layer_amounts: weight name -> that layer's own amount (unstructured_layer_amounts).
    """
    pruned = copy.deepcopy(model)
    weights = prunable_weights(pruned)
    if scores is None:
        scores = {name: w.detach().abs() for name, w in weights.items()}
    masks = masks_with_overrides(scores, amount=amount, scope=scope, overrides=layer_amounts)
    apply_masks(pruned, masks)
    return pruned, masks


def sparse_sizes(model: nn.Module) -> dict[str, Any]:
    """Dense tensor bytes next to two honest sparse sizes of the same weights."""
    weights = {id(w) for w in prunable_weights(model).values()}
    dense = csr = 0
    deflate = zlib.compressobj(6)
    deflated = 0
    for tensor in model.state_dict(keep_vars=True).values():
        raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        dense += raw.nbytes
        deflated += len(deflate.compress(raw.tobytes()))
        if id(tensor) in weights:
            rows = tensor.shape[0]
            nnz = int((tensor != 0).sum())
            # float32 values + int32 column indices + int32 row pointers.
            csr += nnz * (tensor.element_size() + 4) + (rows + 1) * 4
        else:
            csr += tensor.numel() * tensor.element_size()
    return {
        "size_dense_bytes": dense,
        "size_csr_estimate_bytes": csr,
        "size_deflate_bytes": deflated + len(deflate.flush()),
        "size_note": (
            "the saved .pt file is dense: size_dense_bytes is its tensor bytes (the file adds a "
            "small header; its size is the step record's output_size). "
            "size_csr_estimate_bytes: tensor bytes if pruned weights were stored as CSR (fp32 "
            "values, int32 indices), not a file we write; size_deflate_bytes: those dense "
            "tensor bytes DEFLATE-compressed (zlib level 6), about what a zip or gzip of the "
            "file takes on disk"
        ),
    }


# --- gradual (Zhu & Gupta) -------------------------------------------------------------------


def gradual_sparsity(
    step: int, *, initial: float, final: float, start: int, frequency: int, n_events: int
) -> float:
    """Zhu & Gupta's target sparsity at optimizer step `step` (held constant outside the ramp)."""
    if step <= start:
        return initial
    span = n_events * frequency
    if step >= start + span:
        return final
    return final + (initial - final) * (1 - (step - start) / span) ** 3


def prune_gradual(
    model: nn.Module,
    data: Dataset,
    *,
    final: float,
    initial: float = 0.0,
    start: int = 0,
    frequency: int = 10,
    prune_epochs: int = 5,
    finetune_epochs: int = 5,
    importance: Importance = "l1",
    scope: Scope = "layer",
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    layer_amounts: Mapping[str, float] | None = None,
    lr_schedule: LrSchedule = "constant",
    loss_fn: LossFn | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Prune while fine-tuning on the schedule, then fine-tune with the final mask fixed.

    layer_amounts: weight name -> that layer's own final sparsity; it follows the same
    cubic ramp (from min(initial, its final)) as the global target.
    lr_schedule, loss_fn: as `fit` takes them, over the ramp and the fine-tune together.
    """
    pruned = copy.deepcopy(model)
    steps_per_epoch = math.ceil(len(data.y_train) / batch_size)
    ramp_steps = prune_epochs * steps_per_epoch
    n_events = (ramp_steps - start) // frequency
    if n_events < 1:
        raise BadInputError(
            f"gradual pruning: start_step={start} plus frequency={frequency} leaves no pruning "
            f"step inside prune_epochs={prune_epochs} ({ramp_steps} optimizer steps at "
            f"{steps_per_epoch} per epoch); lower them or raise prune_epochs"
        )
    end = start + n_events * frequency
    weights = prunable_weights(pruned)
    taylor = {name: torch.zeros_like(w) for name, w in weights.items()}
    state: dict[str, Any] = {"masks": None, "events": []}

    def prune_to(step: int) -> None:
        target = gradual_sparsity(
            step, initial=initial, final=final, start=start, frequency=frequency, n_events=n_events
        )
        if importance == "gradient" and step > 0:
            scores = {name: taylor[name].clone() for name in weights}
            for t in taylor.values():
                t.zero_()
        elif importance == "gradient":
            scores = gradient_scores(pruned, data.X_train, data.y_train)
            pruned.train()
        else:
            scores = {name: w.detach().abs() for name, w in weights.items()}
        overrides = {
            name: gradual_sparsity(
                step,
                initial=min(initial, own),
                final=own,
                start=start,
                frequency=frequency,
                n_events=n_events,
            )
            for name, own in (layer_amounts or {}).items()
        }
        state["masks"] = masks_with_overrides(
            scores, amount=target, scope=scope, overrides=overrides
        )
        apply_masks(pruned, state["masks"])
        state["events"].append({"step": step, "sparsity": target})

    def after_step(step: int) -> None:
        if importance == "gradient" and step <= end:
            for name, w in weights.items():
                if w.grad is not None:
                    taylor[name] += (w.detach() * w.grad).abs()
        if start <= step <= end and (step - start) % frequency == 0:
            prune_to(step)
        elif state["masks"] is not None:
            # Adam moves pruned weights off zero; the mask puts them back.
            apply_masks(pruned, state["masks"])

    if start == 0 and initial > 0:
        prune_to(0)
    history = fit(
        pruned,
        data.X_train,
        data.y_train,
        epochs=prune_epochs + finetune_epochs,
        lr=lr,
        lr_schedule=lr_schedule,
        batch_size=batch_size,
        seed=seed,
        loss_fn=loss_fn,
        after_step=after_step,
    )
    report = {
        "n_events": n_events,
        "frequency": frequency,
        "start_step": start,
        "end_step": end,
        "steps_per_epoch": steps_per_epoch,
        "schedule": state["events"],
        "final_loss": history["final_loss"],
        "train_time_s": history["train_time_s"],
    }
    return pruned, report


# --- the step --------------------------------------------------------------------------------


class PruneParams(FineTuneFields, LayerControlFields):
    """Params of the `prune_structured` step."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    LAYER_SETTINGS = PRUNE_LAYER_SETTINGS

    method: Literal["structured", "unstructured", "gradual"] = Field(
        default="structured",
        description="structured removes neurons/channels (smaller, faster file); unstructured "
        "zeroes single weights; gradual zeroes them on the Zhu & Gupta schedule while training.",
    )
    amount: float = Field(
        default=0.5,
        ge=0,
        lt=1,
        description="Fraction removed, in [0, 1): of each layer's neurons/channels "
        "(structured) or of the Linear/Conv2d weights (unstructured; gradual: final sparsity).",
    )
    scope: Scope = Field(
        default="layer",
        description="layer: every layer loses `amount`; global: one ranking across layers.",
    )
    importance: Importance = Field(
        default="l1",
        description="Ranking: l1 or l2 norm (for single weights both mean |w|), or gradient "
        "(|w x dL/dw|, unstructured and gradual only).",
    )
    round_to: int = Field(
        default=1,
        ge=1,
        le=256,
        description="Structured: keep channel counts a multiple of this (8 suits SIMD kernels).",
    )
    prune_epochs: int = Field(
        default=5,
        ge=1,
        le=500,
        description="Gradual: epochs over which sparsity ramps from initial_sparsity to amount.",
    )
    frequency: int = Field(
        default=10,
        ge=1,
        le=1_000_000,
        description="Gradual: optimizer steps between mask updates (dt).",
    )
    initial_sparsity: float = Field(
        default=0.0, ge=0, lt=1, description="Gradual: sparsity at start_step (s_i)."
    )
    start_step: int = Field(
        default=0, ge=0, le=10_000_000, description="Gradual: optimizer step where the ramp starts."
    )
    distill_weight: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="Fine-tune by knowledge distillation from the unpruned input model: the "
        "weight alpha of its soft targets in alpha * T^2 * KL + (1 - alpha) * cross-entropy "
        "(0 = the labels only; 1 = the teacher only).",
    )
    distill_temperature: float = Field(
        default=4.0,
        gt=0,
        le=100,
        description="Softmax temperature T of the distillation term (with distill_weight > 0).",
    )
    layers: dict[str, Any] = layers_field(
        '{"amount": a} with a in [0, 1)',
        fallback="`amount`",
        no_match="a pattern matching no Linear/Conv2d layer",
    )

    @model_validator(mode="after")
    def _check_combination(self) -> PruneParams:
        if self.method == "structured" and self.importance == "gradient":
            raise ValueError(
                "importance 'gradient' is for unstructured and gradual pruning; structured "
                "pruning ranks channels by 'l1' or 'l2' norm"
            )
        if self.method == "gradual" and self.initial_sparsity > self.amount:
            raise ValueError(
                f"initial_sparsity {self.initial_sparsity} is above the final amount "
                f"{self.amount}; gradual pruning only raises sparsity"
            )
        return self


def _layer_sparsity(model: nn.Module) -> dict[str, float]:
    return {name: float((w == 0).float().mean()) for name, w in prunable_weights(model).items()}


@register_step("prune_structured", params=PruneParams, accepts={"torch"})
def prune_step(
    model: ModelArtifact, data: Dataset, params: PruneParams, ctx: StepContext
) -> StepOutput:
    """Prune a torch model (structured, unstructured or gradual), then fine-tune it."""
    out = torch_step(model, data, params, ctx, name="prune_structured", transform=_prune)
    if params.method != "structured" and out.model is not None:
        pruned = out.model.obj
        out.metrics["weight_sparsity"] = weight_sparsity(pruned)
        out.metrics["layer_sparsity"] = _layer_sparsity(pruned)
        out.metrics.update(sparse_sizes(pruned))
    return out


def _prune(model: nn.Module, data: Dataset, params: PruneParams, ctx: StepContext) -> Transformed:
    metrics: dict[str, Any] = {"method": params.method, "amount": params.amount}
    if params.layers:
        metrics["layer_settings"] = describe_choices(layer_choices(model, params.layers))
    # `model` is the step's own copy of the input and every method prunes a copy of it, so
    # it stays the unpruned teacher while the pruned copy fine-tunes.
    loss_fn = None
    if params.distill_weight > 0 and params.finetune_epochs + (
        params.prune_epochs if params.method == "gradual" else 0
    ):
        loss_fn = teacher_loss(
            model, temperature=params.distill_temperature, alpha=params.distill_weight
        )
        metrics["distill"] = {
            "teacher": "the unpruned input model",
            "weight": params.distill_weight,
            "temperature": params.distill_temperature,
        }
    if params.method == "gradual":
        pruned, report = prune_gradual(
            model,
            data,
            final=params.amount,
            initial=params.initial_sparsity,
            start=params.start_step,
            frequency=params.frequency,
            prune_epochs=params.prune_epochs,
            finetune_epochs=params.finetune_epochs,
            importance=params.importance,
            scope=params.scope,
            lr=params.lr,
            batch_size=params.batch_size,
            seed=ctx.seed,
            layer_amounts=unstructured_layer_amounts(model, params.layers),
            lr_schedule=params.lr_schedule,
            loss_fn=loss_fn,
        )
        # prune_gradual fine-tunes with the final mask fixed itself.
        return Transformed(pruned, {**metrics, "gradual": report}, trained=True)
    if params.method == "structured":
        pruned = prune_structured(
            model,
            amount=params.amount,
            in_features=data.n_features,
            # A zoo model is a Sequential/ResidualBlock tree; anything else is a user's own.
            example_inputs=None if isinstance(model, _CONTAINERS) else as_tensors(data.X_train[:4]),
            importance="l2" if params.importance == "l2" else "l1",
            scope=params.scope,
            round_to=params.round_to,
            layers=params.layers,
        )
        before, after = _widths(model), _widths(pruned)
        metrics["widths"] = {k: [before[k], after[k]] for k in before if before[k] != after[k]}
        metrics.update(structured_layer_report(model, pruned, params.layers))
        return Transformed(pruned, metrics, loss_fn=loss_fn)
    scores = (
        gradient_scores(model, data.X_train, data.y_train)
        if params.importance == "gradient"
        else None
    )
    pruned, masks = prune_unstructured(
        model,
        amount=params.amount,
        scope=params.scope,
        scores=scores,
        layer_amounts=unstructured_layer_amounts(model, params.layers),
    )
    # Adam moves pruned weights off zero while fine-tuning; the masks put them back.
    return Transformed(
        pruned, metrics, after_step=lambda _s: apply_masks(pruned, masks), loss_fn=loss_fn
    )


# --- CLI -------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: prune one model file through run_step; print one JSON line."""
    from modules.pipeline.script import script_main

    return script_main("prune_structured", argv)


if __name__ == "__main__":
    raise SystemExit(main())
