"""The `quantize_static` step: static, calibrated, per-channel int8 for torch models.

`quantize_dynamic` covers nn.Linear only, so a convolution net keeps its size (a
ResNet-18 stays at 44.8 MB). This step exports the model to ONNX (the `onnx_export`
path) and runs ONNX Runtime's static quantizer on it: QOperator format (QLinearConv, QGemm;
or QDQ with `quant_format`), uint8 activations and int8 weights with one
scale per output channel, activation ranges calibrated on a seeded sample of the
dataset's train split (MinMax, entropy or percentile). Convolutions, Gemm and MatMul all
become int8, BatchNorm is folded into the convolution before, and the output is an ONNX
model (what ONNX Runtime serves), like `onnx_export`'s.

Why ONNX int8 and not PT2E: PT2E's quantizers live in `torch.ao.quantization`, deprecated in
this torch in favour of torchao (not installed here), and a converted PT2E program only
gets int8 kernels through Inductor; its file is a `.pt2` whose safe loading is its own
work. The int8 graph is a plain ONNX file that the safe loader, `onnx_parity`, `measure`
and ONNX Runtime's int8 kernels already take.

An export or quantizer failure is a failed verdict carrying the converter's message, as
in `onnx_export`, so the step is a gate.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import ConfigDict, Field

from modules.core.artifact import ModelArtifact
from modules.core.registry import register_step
from modules.core.step import StepContext, StepOutput, Verdict
from modules.deployment.onnx_export import (
    ExportError,
    OnnxExportParams,
    export_model,
    onnx_artifact,
)
from modules.deployment.onnx_int8 import (
    QuantSettings,
    StaticCalibrationFields,
    calibration_feeds,
    prepare_graph,
    quantize_prepared,
)
from modules.errors import McaasError
from modules.storage.datasets import Dataset
from modules.storage.inputs import dataset_feeds, n_rows, onnx_inputs


class QuantizeStaticParams(StaticCalibrationFields):
    """Params of the `quantize_static` step."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    per_channel: bool = Field(
        default=True, description="One weight scale per output channel (else per tensor)."
    )
    weight_type: Literal["int8", "uint8"] = Field(default="int8", description="Weight type.")
    nodes_to_exclude: tuple[str, ...] = Field(
        default=(),
        max_length=4096,
        description="ONNX node names (e.g. /layer4/conv2/Conv) to leave in float.",
    )
    opset: int = Field(default=17, ge=17, le=21, description="ONNX opset of the export.")


def _settings(params: QuantizeStaticParams) -> QuantSettings:
    return QuantSettings(
        mode="static",
        weight_type=params.weight_type,
        activation_type=params.activation_type,
        per_channel=params.per_channel,
        nodes_to_exclude=tuple(params.nodes_to_exclude),
        calibrate_method=params.calibrate_method,
        percentile=params.percentile,
        smooth_alpha=params.smooth_alpha,
        quant_format=params.quant_format,
    )


def quantize_torch_static(
    model: ModelArtifact, data: Dataset, params: QuantizeStaticParams, ctx: StepContext
) -> tuple[ModelArtifact, dict[str, Any]]:
    """Export to ONNX, calibrate on the train split and quantize; raises on failure."""
    exported, info = export_model(model, data, OnnxExportParams(opset=params.opset))
    proto = exported.obj
    feeds = dataset_feeds(onnx_inputs(proto), data.X_train, dataset=data.name)
    batches = calibration_feeds(
        feeds, samples=params.calibration_samples, batch=params.calibration_batch, seed=ctx.seed
    )
    source, pre_process = prepare_graph(proto, ctx.workdir)
    quantized, details = quantize_prepared(
        source, _settings(params), workdir=ctx.workdir, calibration=batches
    )
    meta = {**exported.meta, "quantized": f"static-{params.weight_type}"}
    size_fp32, size_int8 = proto.ByteSize(), quantized.ByteSize()
    metrics = {
        **details,
        "export": info,
        "pre_process": pre_process,
        "calibration": {
            "dataset": data.name,
            "split": "train",
            "rows": sum(n_rows(b) for b in batches),
        },
        "conv_nodes": sum(n.op_type == "Conv" for n in proto.graph.node),
        "onnx_fp32_size_bytes": size_fp32,
        "size_bytes_after": size_int8,
        "compression_ratio": size_fp32 / size_int8 if size_int8 else None,
    }
    return onnx_artifact(quantized, meta), metrics


def _failed(reason: str) -> StepOutput:
    metrics = {"quantized": False, "error": reason}
    return StepOutput(model=None, metrics=metrics, verdict=Verdict(False, reason))


@register_step("quantize_static", params=QuantizeStaticParams, accepts={"torch"}, gate=True)
def quantize_static(
    model: ModelArtifact, data: Dataset, params: QuantizeStaticParams, ctx: StepContext
) -> StepOutput:
    """Static per-channel int8 through ONNX Runtime (QOperator or QDQ), calibrated on train rows."""
    start = time.perf_counter()
    try:
        artifact, metrics = quantize_torch_static(model, data, params, ctx)
    except ExportError as exc:
        reason = f"ONNX export of the torch model failed: {exc}"
        return StepOutput(
            model=None,
            metrics={"quantized": False, "error": reason},
            verdict=Verdict(False, reason),
        )
    except McaasError:
        raise  # bad input (a dataset that does not fit the model): the runner's clear error
    except Exception as exc:  # ORT's quantizer raises ValueError, RuntimeError, KeyError...
        reason = f"ONNX Runtime static quantization failed: {type(exc).__name__}: {exc}"
        return StepOutput(
            model=None,
            metrics={"quantized": False, "error": reason},
            verdict=Verdict(False, reason),
        )
    metrics.update(quantized=True, quantize_time_s=time.perf_counter() - start)
    reason = (
        f"static {params.weight_type} {'QDQ' if params.quant_format == 'qdq' else 'QOperator'} "
        f"({'per-channel' if params.per_channel else 'per-tensor'}"
        f", {params.calibrate_method}): {metrics['onnx_fp32_size_bytes']:,} -> "
        f"{metrics['size_bytes_after']:,} bytes"
    )
    return StepOutput(model=artifact, metrics=metrics, verdict=Verdict(True, reason))


def main(argv: list[str] | None = None) -> int:
    """`python -m modules.deployment.quantize_static --input-model m.pt --output-model q.onnx`."""
    from modules.pipeline.script import script_main

    return script_main("quantize_static", argv)


if __name__ == "__main__":
    raise SystemExit(main())
