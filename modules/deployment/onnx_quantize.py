"""The `onnx_quantize` step: ONNX Runtime int8 quantization, dynamic or static.

dynamic: weights become int8 ahead of time, activations are quantized on the fly
(`quantize_dynamic`); no data needed. static: activation ranges are calibrated on
batches drawn from the dataset's *train* split (a seeded sample, never the test split
the parity gate and measurements use), or from the user's inputs file for graphs a
dataset cannot feed, and the graph gets QuantizeLinear/DequantizeLinear pairs
(`quantize_static`, QDQ format).

The graph is first run through ORT's `quant_pre_process` (ONNX shape inference and graph
optimisation); a graph it cannot handle is quantized as it is, and the metrics say so.
Unnamed nodes get a stable name, since the quantizer selects and excludes nodes by name;
ORT's dynamic quantizer rewrites a Gemm as `<name>_MatMul` + `<name>_Add`, so a Gemm's own
name is translated to that for it. Graphs with nothing to quantize (no MatMul, Gemm
or Conv) pass through unchanged with a note. A quantizer failure is a failed verdict with
ORT's message, like an export failure.

`search: true` runs the accuracy-aware search of `modules.deployment.onnx_search` instead
of one setting: it keeps the smallest int8 graph that passes the parity thresholds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from modules.core.artifact import ModelArtifact
from modules.core.registry import register_step
from modules.core.step import StepContext, StepOutput, Verdict
from modules.deployment.onnx_export import onnx_artifact
from modules.deployment.parity import GateThresholds, evaluation_feeds, inputs_param
from modules.errors import BadInputError
from modules.storage.datasets import Dataset
from modules.storage.inputs import (
    dataset_feeds,
    load_stored_inputs,
    n_rows,
    onnx_inputs,
    prepare_feeds,
    take_rows,
)

QUANTIZABLE_OPS = frozenset({"MatMul", "Gemm", "Conv"})
INT8_OPS = frozenset(
    {"MatMulInteger", "ConvInteger", "DynamicQuantizeLinear", "QuantizeLinear", "QLinearMatMul"}
)
MAX_NODE_NAME = 256


class OnnxQuantizeParams(GateThresholds):
    """Params of the `onnx_quantize` step (the parity thresholds apply with `search`)."""

    mode: Literal["dynamic", "static"] = Field(
        default="dynamic", description="dynamic (weights only ahead of time) or static (QDQ)."
    )
    weight_type: Literal["int8", "uint8"] = Field(default="int8", description="Weight type.")
    per_channel: bool = Field(default=False, description="Per-channel weight scales.")
    reduce_range: bool = Field(
        default=False,
        description="7-bit weights (ORT's reduce_range): avoids int16 overflow in the int8 "
        "kernels of CPUs without VNNI, at some precision.",
    )
    nodes_to_exclude: tuple[str, ...] = Field(
        default=(),
        max_length=4096,
        description="Graph node names to leave in float (Gemm nodes as <name>_MatMul, the "
        "names the search's trials show).",
    )
    calibration_samples: int = Field(
        default=256,
        ge=1,
        le=100_000,
        description="static: train-split (or inputs-file) samples used to calibrate "
        "activation ranges.",
    )
    calibration_batch: int = Field(
        default=32, ge=1, le=4096, description="static: samples per calibration batch."
    )
    inputs: str | None = Field(
        default=None,
        max_length=64,
        description="Id of an inputs file (POST /v1/inputs), one array per graph input: the "
        "search's evaluation rows and the default calibration rows; none = the dataset "
        "(test split to evaluate, train split to calibrate).",
    )
    calibration_inputs: str | None = Field(
        default=None,
        max_length=64,
        description="Id of a separate inputs file to calibrate on; none = `inputs` (or the "
        "dataset's train split).",
    )
    search: bool = Field(
        default=False,
        description="Search dynamic/static, per-tensor/per-channel, reduce_range, int8/uint8 "
        "and node exclusions for the smallest graph that passes the parity thresholds.",
    )
    max_excluded_nodes: int = Field(
        default=8, ge=0, le=4096, description="search: most nodes left in float."
    )
    max_sensitivity_nodes: int = Field(
        default=64,
        ge=1,
        le=4096,
        description="search: probe nodes one at a time up to this many candidate nodes, "
        "else one op type at a time.",
    )
    max_trials: int = Field(
        default=100, ge=1, le=2000, description="search: most quantizations tried."
    )
    latency_batch: int = Field(
        default=32, ge=1, le=65_536, description="search: rows per timed batch."
    )
    latency_runs: int = Field(
        default=5, ge=2, le=1000, description="search: timed runs per trial (after 1 warm-up)."
    )
    threads: int | None = Field(
        default=1,
        ge=1,
        le=256,
        description="search: ONNX Runtime intra-op threads while evaluating and timing; "
        "none = ORT's default.",
    )

    @field_validator("inputs", "calibration_inputs")
    @classmethod
    def _id_shape(cls, value: str | None) -> str | None:
        return inputs_param(value)

    @field_validator("nodes_to_exclude")
    @classmethod
    def _node_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            bad = not name or len(name) > MAX_NODE_NAME
            if bad or any(unicodedata.category(ch).startswith("C") for ch in name):
                raise ValueError(f"node name {name[:40]!r} must be 1 to 256 printable characters")
        return value


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

    @classmethod
    def of(cls, params: OnnxQuantizeParams) -> QuantSettings:
        return cls(
            mode=params.mode,
            weight_type=params.weight_type,
            per_channel=params.per_channel,
            reduce_range=params.reduce_range,
            nodes_to_exclude=tuple(params.nodes_to_exclude),
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON form; the node lists only when set."""
        out: dict[str, Any] = {
            "mode": self.mode,
            "weight_type": self.weight_type,
            "per_channel": self.per_channel,
            "reduce_range": self.reduce_range,
        }
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


def calibration_batches(
    x_train: np.ndarray, *, samples: int, batch: int, seed: int, dtype: Any = np.float32
) -> list[np.ndarray]:
    """A seeded sample of the train split, cut into batches."""
    rng = np.random.default_rng(seed)
    take = rng.choice(len(x_train), size=min(samples, len(x_train)), replace=False)
    x = np.ascontiguousarray(x_train[np.sort(take)], dtype=dtype)
    return [x[i : i + batch] for i in range(0, len(x), batch)]


def calibration_feeds(
    feeds: dict[str, np.ndarray], *, samples: int, batch: int, seed: int
) -> list[dict[str, np.ndarray]]:
    """The same seeded sample as calibration_batches, over every input of a graph."""
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
    """Silence ORT's quantizer, which logs a root-logger warning per weight it skips."""
    before = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
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
) -> tuple[Any, dict[str, Any]]:
    """Quantize a prepared graph file with one setting; returns (quantized graph, details).

    calibration_cache: where static activation ranges are kept between calls on the same
    graph and data (ranges depend on neither the weight settings nor the node selection).
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
    gemms: set[str] = set()
    if settings.mode == "dynamic" and (settings.nodes_to_exclude or settings.nodes_to_quantize):
        graph = onnx.load(str(source), load_external_data=False)
        gemms = {n.name for n in graph.graph.node if n.op_type == "Gemm"}
    selection = {
        "nodes_to_exclude": _dynamic_names(settings.nodes_to_exclude, gemms) or None,
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

            quantize_static(
                str(source),
                str(dst),
                _Reader(),
                quant_format=QuantFormat.QDQ,
                activation_type=_quant_type(settings.weight_type),
                weight_type=_quant_type(settings.weight_type),
                per_channel=settings.per_channel,
                reduce_range=settings.reduce_range,
                calibration_cache_path=str(calibration_cache) if calibration_cache else None,
                **selection,
            )
    quantized = onnx.load(str(dst))
    dropped = drop_unused_opsets(quantized)
    details = {
        "dropped_opset_imports": dropped,
        "int8_nodes": sum(n.op_type in INT8_OPS for n in quantized.graph.node),
    }
    return quantized, details


def quantize_onnx(
    proto: Any,
    *,
    params: OnnxQuantizeParams,
    workdir: Path,
    calibration: list[np.ndarray] | list[dict[str, np.ndarray]] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Quantize an ONNX graph with ONNX Runtime; returns (quantized graph, details).

    calibration: batches of feeds, or arrays for the graph's first input.
    """
    source, pre_process = prepare_graph(proto, workdir)
    input_name = proto.graph.input[0].name
    batches = [b if isinstance(b, dict) else {input_name: b} for b in calibration or []]
    quantized, details = quantize_prepared(
        source, QuantSettings.of(params), workdir=workdir, calibration=batches or None
    )
    return quantized, {**details, "pre_process": pre_process}


def step_calibration(
    model: ModelArtifact, data: Dataset, params: OnnxQuantizeParams, ctx: StepContext
) -> tuple[list[dict[str, np.ndarray]], dict[str, Any]]:
    """Calibration batches from the inputs file(s), else the train split; and whence."""
    specs = onnx_inputs(model.obj)
    inputs_id = params.calibration_inputs or params.inputs
    if inputs_id is not None:
        if ctx.read_bytes is None:
            raise BadInputError("this runner cannot read stored inputs files")
        arrays = load_stored_inputs(ctx.read_bytes, user_id=ctx.user_id, inputs_id=inputs_id)
        feeds = prepare_feeds(specs, arrays, source=f"inputs file {inputs_id}")
        source: dict[str, Any] = {"inputs": inputs_id}
        if params.calibration_inputs is None:
            source["note"] = "the same file the search evaluates on"
    else:
        feeds = dataset_feeds(specs, data.X_train, dataset=data.name)
        source = {"dataset": data.name, "split": "train"}
    batches = calibration_feeds(
        feeds, samples=params.calibration_samples, batch=params.calibration_batch, seed=ctx.seed
    )
    source["rows"] = sum(n_rows(b) for b in batches)
    return batches, source


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


@register_step("onnx_quantize", params=OnnxQuantizeParams, accepts={"onnx"}, gate=True)
def onnx_quantize(
    model: ModelArtifact, data: Dataset, params: OnnxQuantizeParams, ctx: StepContext
) -> StepOutput:
    """ONNX Runtime int8 quantization: one setting, or a search for the smallest that passes."""
    proto = model.obj
    quantizable = sum(n.op_type in QUANTIZABLE_OPS for n in proto.graph.node)
    size_before = proto.ByteSize()
    if quantizable == 0:
        ops = sorted({n.op_type for n in proto.graph.node})
        note = f"nothing to quantize: no MatMul, Gemm or Conv in the graph (ops: {ops})"
        return StepOutput(
            model=None,
            metrics={"quantized": False, "note": note, "size_bytes_before": size_before},
        )
    if params.search:
        return _search(model, data, params, ctx)
    calibration, source = None, None
    if params.mode == "static":
        calibration, source = step_calibration(model, data, params, ctx)
    start = time.perf_counter()
    try:
        quantized, details = quantize_onnx(
            proto, params=params, workdir=ctx.workdir, calibration=calibration
        )
    except Exception as exc:  # ORT's quantizer raises ValueError, RuntimeError, KeyError...
        reason = f"ONNX Runtime {params.mode} quantization failed: {type(exc).__name__}: {exc}"
        metrics = {"quantized": False, "error": reason}
        return StepOutput(model=None, metrics=metrics, verdict=Verdict(False, reason))
    meta = {**model.meta, "quantized": f"{params.mode}-{params.weight_type}"}
    artifact = onnx_artifact(quantized, meta)
    size_after = quantized.ByteSize()
    metrics = {
        "quantized": True,
        "mode": params.mode,
        "weight_type": params.weight_type,
        "per_channel": params.per_channel,
        "reduce_range": params.reduce_range,
        "nodes_excluded": len(params.nodes_to_exclude),
        "quantizable_nodes": quantizable,
        "size_bytes_before": size_before,
        "size_bytes_after": size_after,
        "compression_ratio": size_before / size_after if size_after else None,
        "quantize_time_s": time.perf_counter() - start,
        "calibration_samples": source["rows"] if source else 0,
        "calibration": source,
        **details,
    }
    reason = (
        f"{params.mode} {params.weight_type} quantization: {size_before:,} -> {size_after:,} bytes"
    )
    return StepOutput(model=artifact, metrics=metrics, verdict=Verdict(True, reason))


def _search(
    model: ModelArtifact, data: Dataset, params: OnnxQuantizeParams, ctx: StepContext
) -> StepOutput:
    from modules.deployment.onnx_search import SearchBudget, search_int8

    feeds, source = evaluation_feeds(model.obj, data, inputs_id=params.inputs, ctx=ctx)
    calibration, calibration_source = step_calibration(model, data, params, ctx)
    start = time.perf_counter()
    result = search_int8(
        model.obj,
        feeds=feeds,
        calibration=calibration,
        thresholds=params,
        meta=model.meta,
        workdir=ctx.workdir,
        budget=SearchBudget.of(params),
    )
    summary = {
        "quantized": result.model is not None,
        "search": True,
        "kind": result.kind,
        "kind_reason": result.kind_reason,
        "inputs": source,
        "calibration": calibration_source,
        "pre_process": result.pre_process,
        "fp32": result.fp32,
        "chosen": result.chosen,
        "n_trials": len(result.trials),
        "stopped": result.stopped,
        "search_time_s": time.perf_counter() - start,
    }
    files = {
        "int8_search.json": json.dumps(
            {**summary, "trials": result.trials}, indent=2, default=str
        ).encode()
    }
    metrics = {**summary, "trials": result.trials}
    if result.model is None or result.chosen is None:
        return StepOutput(model=None, metrics=metrics, files=files, verdict=result.verdict)
    settings = result.chosen["settings"]
    meta = {**model.meta, "quantized": f"{settings['mode']}-{settings['weight_type']}"}
    size_after = result.model.ByteSize()
    metrics.update(
        mode=settings["mode"],
        weight_type=settings["weight_type"],
        size_bytes_before=model.obj.ByteSize(),
        size_bytes_after=size_after,
        compression_ratio=model.obj.ByteSize() / size_after if size_after else None,
    )
    return StepOutput(
        model=onnx_artifact(result.model, meta),
        metrics=metrics,
        files=files,
        verdict=result.verdict,
    )


def stage_inputs_file(workspace: Path, path: Path) -> str:
    """Validate a local .npz and put it in a LocalWorkspace's store as user `local`; its id."""
    import hashlib

    from modules.storage.artifacts import LocalStore
    from modules.storage.inputs import MAX_INPUTS_BYTES, inputs_key, read_inputs

    if not path.is_file():
        raise BadInputError(f"inputs file {path} does not exist")
    if path.stat().st_size > MAX_INPUTS_BYTES:
        raise BadInputError(f"inputs file {path} is over {MAX_INPUTS_BYTES:,} bytes")
    data = path.read_bytes()
    read_inputs(data, name=path.name)
    inputs_id = hashlib.sha256(data).hexdigest()[:20]
    LocalStore(workspace / "store").put_bytes(inputs_key("local", inputs_id), data)
    return inputs_id


def main(argv: list[str] | None = None) -> int:
    """`python -m modules.deployment.onnx_quantize --input-model m.onnx --output-model q.onnx`."""
    import tempfile

    from modules.pipeline.script import base_parser, script_main

    parser = base_parser("Quantize an ONNX model to int8 with ONNX Runtime.")
    parser.add_argument("--mode", default="dynamic", help="dynamic | static.")
    parser.add_argument("--weight-type", default="int8", help="int8 | uint8.")
    parser.add_argument("--per-channel", action="store_true", help="Per-channel scales.")
    parser.add_argument("--reduce-range", action="store_true", help="7-bit weights.")
    parser.add_argument(
        "--calibration-samples", type=int, default=256, help="static: train samples."
    )
    parser.add_argument(
        "--search", action="store_true", help="Search for the smallest graph that passes parity."
    )
    parser.add_argument("--inputs", type=Path, help=".npz with one array per graph input.")
    parser.add_argument("--calibration-inputs", type=Path, help=".npz to calibrate on.")
    parser.add_argument(
        "--output-kind", default="auto", help="auto | labels | embedding | regression."
    )
    parser.add_argument("--min-cosine", type=float, default=0.99, help="embedding: min cosine.")
    parser.add_argument(
        "--max-excluded-nodes", type=int, default=8, help="search: most nodes left in float."
    )
    with tempfile.TemporaryDirectory(prefix="mcaas-quantize-") as tmp:
        workspace = Path(tmp)

        def to_params(a: Any) -> dict[str, Any]:
            params: dict[str, Any] = {
                "mode": a.mode,
                "weight_type": a.weight_type,
                "per_channel": a.per_channel,
                "reduce_range": a.reduce_range,
                "calibration_samples": a.calibration_samples,
                "search": a.search,
                "output_kind": a.output_kind,
                "min_cosine": a.min_cosine,
                "max_excluded_nodes": a.max_excluded_nodes,
            }
            if a.inputs is not None:
                params["inputs"] = stage_inputs_file(workspace, a.inputs)
            if a.calibration_inputs is not None:
                params["calibration_inputs"] = stage_inputs_file(workspace, a.calibration_inputs)
            return params

        return script_main("onnx_quantize", parser, to_params, argv, workspace=workspace)


if __name__ == "__main__":
    raise SystemExit(main())
