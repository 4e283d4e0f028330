"""ONNX Runtime int8 quantization as pure functions: settings, graph preparation, quantizing.

What the `onnx_quantize` step and its accuracy-aware search (`onnx_search`) both run: a
graph is prepared once (`prepare_graph`: ORT's `quant_pre_process`, then a stable name for
every node, since the quantizer selects and excludes nodes by name), then quantized with one
`QuantSettings` (`quantize_prepared`). ORT's dynamic quantizer rewrites a Gemm as
`<name>_MatMul` + `<name>_Add`, so a Gemm's own name is translated to that for it.

Static settings also choose the activation type (uint8 with int8 weights is ORT's fast x86
layout), the calibration method (MinMax, entropy, percentile; each keeps its own range
cache), SmoothQuant (`smooth_alpha`: modules.deployment.onnx_smooth runs first, and the
Mul nodes it inserts stay float) and the format of the graph (`quant_format`):

* `qoperator` (the default): QLinearConv, QGemm, QLinearMatMul, QLinearAdd... ops that
  read int8 tensors directly. A bias is int32 at the implied scale (input scale x weight
  scale), so it costs 4 bytes per channel; a zoo CNN came out 7% smaller than in QDQ.
* `qdq`: float ops between QuantizeLinear/DequantizeLinear pairs, which ONNX Runtime fuses
  into the same int8 kernels at load time (measured: the same latency as QOperator here),
  with a scale and a zero point stored for every bias besides the weight's.

Every quantized graph is then compacted (modules.deployment.onnx_compact: short names,
shared scalars, no doc strings or default attributes), which changes no output bit.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from modules.deployment.onnx_compact import compact_graph
from modules.errors import BadInputError
from modules.storage.inputs import n_rows, take_rows

INT8_OPS = frozenset(
    {
        "MatMulInteger",
        "ConvInteger",
        "DynamicQuantizeLinear",
        "QuantizeLinear",
        "QLinearMatMul",
        "QLinearConv",
        "QGemm",
        "QLinearAdd",
        "QLinearMul",
        "QLinearGlobalAveragePool",
        "QLinearAveragePool",
        "QLinearConcat",
        "QLinearSoftmax",
        "QLinearLeakyRelu",
        "QLinearSigmoid",
    }
)
QUANT_FORMATS = ("qoperator", "qdq")


class StaticCalibrationFields(BaseModel):
    """The params of static int8 calibration, shared by `onnx_quantize` (mode static) and
    `quantize_static`: how activation ranges are found, their type and the graph format."""

    calibration_samples: int = Field(
        default=256,
        ge=1,
        le=100_000,
        description="Static int8: train-split (or inputs-file) samples, seeded, used to "
        "calibrate activation ranges.",
    )
    calibration_batch: int = Field(
        default=32, ge=1, le=4096, description="Static int8: samples per calibration batch."
    )
    activation_type: Literal["uint8", "int8"] = Field(
        default="uint8",
        description="Static int8: activation type. uint8 activations with int8 weights (U8S8) "
        "take ONNX Runtime's fast x86 int8 kernels; int8 x int8 QDQ convolutions were "
        "measured slower than fp32 here.",
    )
    quant_format: Literal["qoperator", "qdq"] = Field(
        default="qoperator",
        description="Static int8: QOperator (QLinearConv, QGemm...: int8 ops, biases at the "
        "implied scale) or QDQ (float ops between Quantize/DequantizeLinear pairs, which ONNX "
        "Runtime fuses into the same kernels). QOperator measured smaller at the same "
        "latency here.",
    )
    calibrate_method: Literal["minmax", "entropy", "percentile"] = Field(
        default="minmax",
        description="Static int8: activation ranges from the min/max seen, the KL-divergence "
        "(entropy) optimum of a histogram, or a percentile of |activation| (clips outliers).",
    )
    percentile: float = Field(
        default=99.999,
        ge=90.0,
        le=100.0,
        description="Static int8, calibrate_method=percentile: share (%) of |activation| "
        "values the range covers.",
    )
    smooth_alpha: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="SmoothQuant: migrate activation outliers into the weights with scale "
        "max|X|^a / max|W|^(1-a) per channel before quantizing (0.5 is the paper's default "
        "for most transformers); none = off. Needs calibration rows.",
    )


@dataclass(frozen=True)
class QuantSettings:
    """One int8 configuration of ONNX Runtime's quantizer."""

    mode: str = "dynamic"
    weight_type: str = "int8"
    per_channel: bool = False
    reduce_range: bool = False
    nodes_to_exclude: tuple[str, ...] = ()
    # Empty: every node the quantizer supports; else only these (a sensitivity probe).
    nodes_to_quantize: tuple[str, ...] = field(default=())
    # static: the activations' type; None = weight_type (what the search's grid runs).
    activation_type: str | None = None
    # static: how activation ranges are read off the calibration batches.
    calibrate_method: str = "minmax"
    # percentile calibration: the share of |activation| values the range covers.
    percentile: float = 99.999
    # SmoothQuant migration strength (None: off), applied before quantizing.
    smooth_alpha: float | None = None
    # static: QLinear ops reading int8 directly, or float ops between Q/DQ pairs.
    quant_format: str = "qoperator"

    def as_dict(self) -> dict[str, Any]:
        """JSON form; the node lists only when set."""
        out: dict[str, Any] = {
            "mode": self.mode,
            "weight_type": self.weight_type,
            "per_channel": self.per_channel,
            "reduce_range": self.reduce_range,
        }
        # Defaults stay out, so the JSON of a plain setting is what it was before they existed.
        if self.activation_type is not None:
            out["activation_type"] = self.activation_type
        if self.mode == "static":
            out["quant_format"] = self.quant_format
        if self.calibrate_method != "minmax":
            out["calibrate_method"] = self.calibrate_method
            if self.calibrate_method == "percentile":
                out["percentile"] = self.percentile
        if self.smooth_alpha is not None:
            out["smooth_alpha"] = self.smooth_alpha
        if self.nodes_to_exclude:
            out["nodes_to_exclude"] = list(self.nodes_to_exclude)
        if self.nodes_to_quantize:
            out["nodes_to_quantize"] = list(self.nodes_to_quantize)
        return out

    def label(self) -> str:
        """Like `dynamic int8 per-channel reduce-range, in float: /blocks.1/out/MatMul`."""
        parts = [self.mode, self.weight_type, "per-channel" if self.per_channel else "per-tensor"]
        if self.reduce_range:
            parts.append("reduce-range")
        if self.mode == "static" and self.activation_type not in (None, self.weight_type):
            parts.append(f"{self.activation_type} activations")
        if self.mode == "static" and self.calibrate_method != "minmax":
            parts.append(f"{self.calibrate_method}-calibrated")
        if self.mode == "static":
            parts.append("QDQ" if self.quant_format == "qdq" else "QOperator")
        if self.smooth_alpha is not None:
            parts.append(f"smoothquant-{self.smooth_alpha:g}")
        text = " ".join(parts)
        excluded = self.nodes_to_exclude
        if len(excluded) > 3:
            text += f", {len(excluded)} nodes in float"
        elif excluded:
            text += f", in float: {', '.join(excluded)}"
        if self.nodes_to_quantize:
            text += f", only {', '.join(self.nodes_to_quantize)} quantized"
        return text


def _quant_type(name: str) -> Any:
    from onnxruntime.quantization import QuantType

    return QuantType.QInt8 if name == "int8" else QuantType.QUInt8


def _calibrate_method(name: str) -> Any:
    from onnxruntime.quantization import CalibrationMethod

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    if name not in methods:
        raise BadInputError(f"calibrate_method {name!r}: expected one of {', '.join(methods)}")
    return methods[name]


def _method_cache(cache: Path | None, settings: QuantSettings) -> str | None:
    # Ranges differ per calibration method (and percentile), so each gets its own cache file.
    if cache is None:
        return None
    if settings.calibrate_method == "minmax" and settings.smooth_alpha is None:
        return str(cache)
    tag = settings.calibrate_method
    if tag == "percentile":
        tag += f"-{settings.percentile:g}"
    if settings.smooth_alpha is not None:
        # A smoothed graph has other activations, hence other ranges.
        tag += f"-smooth{settings.smooth_alpha:g}"
    return str(cache.with_name(f"{cache.stem}.{tag}{cache.suffix}"))


def _calibrate_options(settings: QuantSettings) -> dict[str, Any]:
    if settings.calibrate_method == "percentile":
        return {"CalibPercentile": settings.percentile}
    return {}


def calibration_feeds(
    feeds: dict[str, np.ndarray], *, samples: int, batch: int, seed: int
) -> list[dict[str, np.ndarray]]:
    """A seeded sample of the rows of every input, cut into calibration batches."""
    rng = np.random.default_rng(seed)
    total = n_rows(feeds)
    take = np.sort(rng.choice(total, size=min(samples, total), replace=False))
    picked = take_rows(feeds, take)
    return [take_rows(picked, slice(i, i + batch)) for i in range(0, len(take), batch)]


def _pre_process(src: Path, dst: Path) -> str:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        # Symbolic shape inference is for dynamic-shape transformer graphs; when it gives up
        # it also drops a temp file into the working directory, so it stays off.
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    except Exception as exc:  # ONNX shape inference or the optimizer gives up on some graphs
        return f"skipped ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
    return "done"


def prepare_graph(proto: Any, workdir: Path) -> tuple[Path, str]:
    """Pre-process once and name every node; returns (prepared file, pre-process status)."""
    import onnx

    src, pre, prepared = workdir / "model.onnx", workdir / "pre.onnx", workdir / "prepared.onnx"
    onnx.save(proto, str(src))
    status = _pre_process(src, pre)
    graph = onnx.load(str(pre if status == "done" else src))
    names = {n.name for n in graph.graph.node if n.name}
    for i, node in enumerate(graph.graph.node):
        if not node.name:
            # The quantizer selects and excludes nodes by name; unnamed ones get a stable one.
            name = f"{node.op_type}_{i}"
            while name in names:
                name += "_"
            node.name = name
            names.add(name)
    onnx.save(graph, str(prepared))
    return prepared, status


@contextlib.contextmanager
def quiet_quantizer() -> Iterator[None]:
    """Silence ORT's quantizer, which logs a root-logger warning per weight it skips.

    Its entropy and percentile calibrators also print their progress to stdout, which is
    the CLI's (a step writes its results to its record, never to the terminal).
    """
    before = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(before)


def _dynamic_names(names: tuple[str, ...], gemms: set[str]) -> list[str]:
    # The dynamic quantizer turns Gemm `g` into MatMul `g_MatMul` before it selects nodes.
    out = []
    for name in names:
        out.append(name)
        if name in gemms:
            out.append(f"{name}_MatMul")
    return out


def quantize_prepared(
    source: Path,
    settings: QuantSettings,
    *,
    workdir: Path,
    calibration: list[dict[str, np.ndarray]] | None = None,
    calibration_cache: Path | None = None,
    compact: bool = True,
) -> tuple[Any, dict[str, Any]]:
    """Quantize a prepared graph file with one setting; returns (quantized graph, details).

    calibration_cache: where static activation ranges are kept between calls on the same
    graph and data (ranges depend on neither the weight settings, the format nor the node
    selection).
    compact: run the compaction pass (off where a caller matches tensors by name, as the
    search's sensitivity pass does).
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        quantize_dynamic,
        quantize_static,
    )

    dst = workdir / "quantized.onnx"
    dst.unlink(missing_ok=True)
    smoothing: dict[str, Any] | None = None
    if settings.smooth_alpha is not None:
        source, smoothing = _smoothed(source, settings.smooth_alpha, workdir, calibration)
    gemms: set[str] = set()
    if settings.mode == "dynamic" and (
        settings.nodes_to_exclude or settings.nodes_to_quantize or smoothing
    ):
        graph = onnx.load(str(source), load_external_data=False)
        gemms = {n.name for n in graph.graph.node if n.op_type == "Gemm"}
    excluded = settings.nodes_to_exclude
    if smoothing is not None:
        excluded += tuple(smoothing["inserted_mul"])
    selection = {
        "nodes_to_exclude": _dynamic_names(excluded, gemms) or None,
        "nodes_to_quantize": _dynamic_names(settings.nodes_to_quantize, gemms) or None,
    }
    with quiet_quantizer():
        if settings.mode == "dynamic":
            quantize_dynamic(
                str(source),
                str(dst),
                weight_type=_quant_type(settings.weight_type),
                per_channel=settings.per_channel,
                reduce_range=settings.reduce_range,
                **selection,
            )
        else:
            if not calibration:
                raise BadInputError("static quantization needs calibration batches")
            batches = iter(calibration)

            class _Reader(CalibrationDataReader):
                def get_next(self) -> dict[str, np.ndarray] | None:
                    return next(batches, None)

            if settings.quant_format not in QUANT_FORMATS:
                raise BadInputError(
                    f"quant_format {settings.quant_format!r}: expected one of "
                    f"{', '.join(QUANT_FORMATS)}"
                )
            quantize_static(
                str(source),
                str(dst),
                _Reader(),
                quant_format=(
                    QuantFormat.QDQ if settings.quant_format == "qdq" else QuantFormat.QOperator
                ),
                activation_type=_quant_type(settings.activation_type or settings.weight_type),
                weight_type=_quant_type(settings.weight_type),
                per_channel=settings.per_channel,
                reduce_range=settings.reduce_range,
                calibrate_method=_calibrate_method(settings.calibrate_method),
                calibration_cache_path=_method_cache(calibration_cache, settings),
                extra_options=_calibrate_options(settings),
                **selection,
            )
    quantized = onnx.load(str(dst))
    dropped = drop_unused_opsets(quantized)
    details: dict[str, Any] = {
        "dropped_opset_imports": dropped,
        "int8_nodes": sum(n.op_type in INT8_OPS for n in quantized.graph.node),
    }
    if compact:
        # Nodes the user named to stay in float keep their names, so they can be found.
        details["compaction"] = compact_graph(quantized, keep_node_names=set(excluded))
    if settings.mode == "static":
        details["calibrate_method"] = settings.calibrate_method
        details["quant_format"] = settings.quant_format
    if smoothing is not None:
        details["smooth_quant"] = smoothing
    return quantized, details


def _smoothed(
    source: Path, alpha: float, workdir: Path, calibration: list[dict[str, np.ndarray]] | None
) -> tuple[Path, dict[str, Any]]:
    import onnx

    from modules.deployment.onnx_smooth import smooth_graph

    if not calibration:
        raise BadInputError("SmoothQuant needs calibration batches (static mode or an inputs file)")
    smoothed, info = smooth_graph(onnx.load(str(source)), calibration, alpha=alpha)
    path = workdir / f"smoothed-{alpha:g}.onnx"
    onnx.save(smoothed, str(path))
    return path, info


def drop_unused_opsets(proto: Any) -> list[str]:
    """Remove opset imports of domains no node uses; returns the removed domains.

    ORT's quantizer declares every domain it knows (ai.onnx.preview, org.pytorch.aten, ...);
    the safe loader refuses undeclared-by-us domains, and an unused import means nothing.
    """
    used = {""} | {node.domain for node in proto.graph.node}
    used |= {node.domain for function in proto.functions for node in function.node}
    keep = [entry for entry in proto.opset_import if entry.domain in used]
    dropped = sorted(entry.domain for entry in proto.opset_import if entry.domain not in used)
    del proto.opset_import[:]
    proto.opset_import.extend(keep)
    return dropped
