"""Dynamic quantization of nn.Linear: int8 weights with per-channel scales, or float16.

Why not torch.ao.quantization.quantize_dynamic: it is deprecated in this torch, and its
modules hold packed params that a weights-only load cannot read. Our Int8Linear (in the
zoo's allow-list) stores a plain int8 weight, one float32 scale per output row and the
bias, so the file is about 4x smaller and loads with weights_only=True; its forward uses
the quantized engine's dynamic int8 kernel (activations quantized per batch), or
dequantizes where that kernel is missing. Float16Linear stores and computes in float16.
Conv2d layers stay float32, as in torch's dynamic quantization, and so do weights an
exported graph multiplies directly (a fused attention in_proj; metrics name them in
kept_float32). These modules do not export to ONNX: the ONNX stage quantizes inside ONNX
Runtime instead. A quantized .pt2 program is stored with its int8 (or float16) tensors:
under torch.export Int8Linear traces its dequantizing path, and graph_layers.lift_layers
turns it back into the layer when the program is loaded.

CLI: python -m modules.compression.quantize_dynamic in.pt out.pt [--dtype int8|float16]
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import ConfigDict, Field
from torch import fx, nn

from modules.compression.layer_select import (
    LayerChoice,
    LayerControlFields,
    check_layer_settings,
    describe_choices,
    layers_field,
    one_of,
    resolve_layers,
)
from modules.compression.scaffold import Transformed, torch_step
from modules.core.artifact import ModelArtifact
from modules.core.registry import register_step
from modules.core.step import StepContext, StepOutput
from modules.errors import BadInputError
from modules.storage.datasets import Dataset
from modules.storage.layers import Float16Linear, Int8Linear

QuantDtype = Literal["int8", "float16"]
# A layer's own setting in `layers`: its dtype, or "skip" (the layer stays float32).
QUANTIZE_LAYER_SETTINGS = {"dtype": one_of("int8", "float16")}


def quantize_linear_int8(linear: nn.Linear) -> Int8Linear:
    """Symmetric per-output-channel int8: scale = max|w_row| / 127, q = round(w / scale)."""
    weight = linear.weight.detach().float()
    # An all-zero row (a pruned neuron) gets a tiny scale instead of a division by zero.
    scale = (weight.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
    out = Int8Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    with torch.no_grad():
        out.weight.copy_(q)
        out.scale.copy_(scale)
        if linear.bias is not None and out.bias is not None:
            out.bias.copy_(linear.bias.detach().float())
    return out


def linear_to_float16(linear: nn.Linear) -> Float16Linear:
    """The same Linear with float16 weight and bias."""
    out = Float16Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    with torch.no_grad():
        out.weight.copy_(linear.weight.detach().half())
        if linear.bias is not None and out.bias is not None:
            out.bias.copy_(linear.bias.detach().half())
    return out


_CONVERT: dict[str, Callable[[nn.Linear], nn.Module]] = {
    "int8": quantize_linear_int8,
    "float16": linear_to_float16,
}


def _replace_linears(
    module: nn.Module, dtype_of: Callable[[str], str | None], prefix: str = ""
) -> list[str]:
    """Convert each nn.Linear to the dtype `dtype_of(its name)` gives (None: leave it)."""
    replaced: list[str] = []
    for name, child in list(module.named_children()):
        where = f"{prefix}{name}"
        if type(child) is nn.Linear:
            dtype = dtype_of(where)
            if dtype is not None:
                setattr(module, name, _CONVERT[dtype](child))
                replaced.append(where)
        else:
            replaced += _replace_linears(child, dtype_of, f"{where}.")
    return replaced


def quantize_layer_choices(model: nn.Module, layers: Mapping[str, Any]) -> dict[str, LayerChoice]:
    """Resolve a `layers` param against the model's nn.Linear layers."""
    if not layers:
        return {}
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    checked = check_layer_settings(layers, allowed=QUANTIZE_LAYER_SETTINGS)
    return resolve_layers(
        checked, names, step="quantize_dynamic", hint=" (dynamic quantization covers Linear only)"
    )


def quantize_dynamic(
    model: nn.Module, *, dtype: QuantDtype = "int8", layers: Mapping[str, Any] | None = None
) -> tuple[nn.Module, list[str]]:
    """A copy of `model` with every nn.Linear quantized; returns it and the layers changed.

    layers: per-layer control (see layer_select): a layer's own {"dtype": ...} or "skip".
    """
    if dtype not in ("int8", "float16"):
        raise BadInputError(f"dtype must be 'int8' or 'float16', got {dtype!r}")
    quantized = copy.deepcopy(model).eval()
    choices = quantize_layer_choices(quantized, layers or {})

    def dtype_of(name: str) -> str | None:
        choice = choices.get(name)
        if choice is None:
            return dtype
        return None if choice.setting is None else str(choice.setting["dtype"])

    replaced = _replace_linears(quantized, dtype_of)
    if not replaced and choices:
        raise BadInputError(
            f"quantize_dynamic: layers skips every Linear layer ({', '.join(choices)}); "
            "nothing left to quantize"
        )
    if not replaced:
        found = sorted({type(m).__name__ for m in model.modules() if not list(m.children())})
        raise BadInputError(
            f"quantize_dynamic found no nn.Linear layer to quantize (the model has {found}); "
            "dynamic quantization covers Linear layers only"
        )
    return quantized, replaced


def graph_linear_owners(model: nn.Module) -> list[str]:
    """Modules whose weights an exported graph multiplies directly (a fused attention in_proj).

    lift_layers turns a linear call into a layer only when the path holds just that layer's
    tensors; these stay function calls on raw parameters, so they stay float32.
    """
    if not isinstance(model, fx.GraphModule):
        return []
    owners = set()
    for node in model.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.linear.default:
            weight = node.args[1]
            if isinstance(weight, fx.Node) and weight.op == "get_attr":
                owners.add(str(weight.target).rpartition(".")[0] or "model")
    return sorted(owners)


def int8_kernel(model: nn.Module) -> str:
    """Which int8 path the model's Int8Linear layers take on this machine."""
    layer = next((m for m in model.modules() if isinstance(m, Int8Linear)), None)
    if layer is None:
        return "none"
    if layer._packed_weight() is None:
        return "dequantize to float32 (no quantized engine kernel)"
    return f"torch.ops.quantized.linear_dynamic ({torch.backends.quantized.engine})"


class QuantizeParams(LayerControlFields):
    """Params of the `quantize_dynamic` step."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    LAYER_SETTINGS = QUANTIZE_LAYER_SETTINGS

    dtype: QuantDtype = Field(
        default="int8",
        description="int8: int8 weights with per-channel scales, int8 kernels at run time; "
        "float16: half-precision weights and compute.",
    )
    layers: dict[str, Any] = layers_field(
        '{"dtype": "int8" | "float16"}',
        fallback="`dtype`",
        no_match="a pattern matching no Linear",
    )


@register_step("quantize_dynamic", params=QuantizeParams, accepts={"torch"})
def quantize_step(
    model: ModelArtifact, data: Dataset, params: QuantizeParams, ctx: StepContext
) -> StepOutput:
    """Quantize every nn.Linear to int8 (per-channel) or float16; Conv2d stays float32."""
    return torch_step(
        model, data, params, ctx, name="quantize_dynamic", transform=_quantize, fine_tune=False
    )


def _quantize(
    model: nn.Module, _data: Dataset, params: QuantizeParams, _ctx: StepContext
) -> Transformed:
    quantized, layers = quantize_dynamic(model, dtype=params.dtype, layers=params.layers)
    metrics: dict[str, Any] = {
        "dtype": params.dtype,
        "quantized_layers": layers,
        "kept_float32": sorted(
            [name for name, m in quantized.named_modules() if isinstance(m, nn.Conv2d)]
            + graph_linear_owners(quantized)
        ),
        "kernel": int8_kernel(quantized) if params.dtype == "int8" else "float16 F.linear",
    }
    if params.layers:
        choices = quantize_layer_choices(model, params.layers)
        metrics["layer_settings"] = describe_choices(choices)
        metrics["skipped_layers"] = [n for n, c in choices.items() if c.skip]
        kinds = {Int8Linear: "int8", Float16Linear: "float16", nn.Linear: "float32"}
        metrics["layer_dtypes"] = {
            name: kinds[type(m)] for name, m in quantized.named_modules() if type(m) in kinds
        }
    return Transformed(quantized, metrics, meta={"quantized": params.dtype})


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: quantize one model file through run_step; print one JSON line."""
    from modules.pipeline.script import ScriptOptions, script_main

    return script_main("quantize_dynamic", argv, ScriptOptions(positional_io=True))


if __name__ == "__main__":
    raise SystemExit(main())
