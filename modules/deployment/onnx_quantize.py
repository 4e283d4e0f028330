"""The `onnx_quantize` step: ONNX Runtime int8 quantization, dynamic or static.

dynamic: weights become int8 ahead of time, activations are quantized on the fly
(`quantize_dynamic`); no data needed. static: activation ranges are calibrated on
batches drawn from the dataset's *train* split (a seeded sample, never the test split
the parity gate and measurements use), or from the user's inputs file for graphs a
dataset cannot feed, and the graph gets int8 ops (`quantize_static`; QLinearConv, QGemm...
in QOperator format by default, QuantizeLinear/DequantizeLinear pairs with
`quant_format: qdq`), with ranges from `calibrate_method` (MinMax, entropy or
percentile) and per-channel weight scales with `per_channel`. `smooth_alpha` first migrates
activation outliers into the weights (SmoothQuant, modules.deployment.onnx_smooth).

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

import json
import time
import unicodedata
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from modules.core.artifact import ModelArtifact
from modules.core.registry import register_step
from modules.core.step import StepContext, StepOutput, Verdict, report_progress
from modules.deployment.onnx_export import onnx_artifact
from modules.deployment.onnx_int8 import (
    QuantSettings,
    StaticCalibrationFields,
    calibration_feeds,
    prepare_graph,
    quantize_prepared,
)
from modules.deployment.onnx_search import SearchBudget, parity_report, search_int8
from modules.deployment.parity import (
    DeployBatches,
    deploy_batch_sizes,
    evaluation_feeds,
    inputs_param,
)
from modules.deployment.parity_metrics import GateThresholds
from modules.errors import BadInputError
from modules.storage.datasets import Dataset
from modules.storage.inputs import (
    dataset_feeds,
    load_stored_inputs,
    n_rows,
    onnx_inputs,
    prepare_feeds,
    stage_inputs_file,
    take_rows,
)

QUANTIZABLE_OPS = frozenset({"MatMul", "Gemm", "Conv"})
MAX_NODE_NAME = 256


class OnnxQuantizeParams(GateThresholds, DeployBatches, StaticCalibrationFields):
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
    max_search_s: float | None = Field(
        default=None,
        ge=1,
        le=86_400,
        description="search: wall-clock budget of the trials in seconds (the search stops "
        "with the best so far and says so); none = no limit.",
    )
    holdout_fraction: float = Field(
        default=0.5,
        ge=0.1,
        le=0.9,
        description="search: when the search would calibrate on the rows it scores on (one "
        "inputs file for both), this share of the rows (seeded) is held out to score on and "
        "the rest calibrates, so the search judges on rows it did not calibrate on.",
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

    @model_validator(mode="after")
    def _static_only(self) -> OnnxQuantizeParams:
        if self.mode != "static" and not self.search and self.calibrate_method != "minmax":
            raise ValueError(
                f"calibrate_method={self.calibrate_method} needs mode=static: dynamic mode "
                "measures activation ranges at run time and calibrates nothing"
            )
        return self

    @field_validator("nodes_to_exclude")
    @classmethod
    def _node_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            bad = not name or len(name) > MAX_NODE_NAME
            if bad or any(unicodedata.category(ch).startswith("C") for ch in name):
                raise ValueError(f"node name {name[:40]!r} must be 1 to 256 printable characters")
        return value


def quant_settings(params: OnnxQuantizeParams) -> QuantSettings:
    """The one quantizer setting the params name (what a step without `search` runs)."""
    return QuantSettings(
        mode=params.mode,
        weight_type=params.weight_type,
        per_channel=params.per_channel,
        reduce_range=params.reduce_range,
        nodes_to_exclude=tuple(params.nodes_to_exclude),
        activation_type=params.activation_type if params.mode == "static" else None,
        calibrate_method=params.calibrate_method,
        percentile=params.percentile,
        smooth_alpha=params.smooth_alpha,
        quant_format=params.quant_format,
    )


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
        source, quant_settings(params), workdir=workdir, calibration=batches or None
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
    if params.mode == "static" or params.smooth_alpha is not None:
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
        "smooth_alpha": params.smooth_alpha,
        "quant_format": params.quant_format if params.mode == "static" else None,
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


def held_out_split(
    feeds: dict[str, np.ndarray], *, fraction: float, seed: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(scored rows, calibration rows): a seeded split of the rows of every input."""
    rows = n_rows(feeds)
    if rows < 2:
        raise BadInputError(
            f"the inputs file has {rows} row(s); the search needs at least 2 to score on rows "
            "it does not calibrate on (or give calibration_inputs)"
        )
    order = np.random.default_rng(seed).permutation(rows)
    held = min(max(1, round(rows * fraction)), rows - 1)
    return take_rows(feeds, np.sort(order[:held])), take_rows(feeds, np.sort(order[held:]))


def search_rows(
    model: ModelArtifact, data: Dataset, params: OnnxQuantizeParams, ctx: StepContext
) -> tuple[dict[str, np.ndarray], dict[str, Any], list[dict[str, np.ndarray]], dict[str, Any]]:
    """(scored feeds, whence, calibration batches, whence): never the same rows for both."""
    feeds, source = evaluation_feeds(model.obj, data, inputs_id=params.inputs, ctx=ctx)
    if params.inputs is None or params.calibration_inputs is not None:
        # The test split against the train split, or two files: disjoint already.
        calibration, calibration_source = step_calibration(model, data, params, ctx)
        return feeds, source, calibration, calibration_source
    scored, rest = held_out_split(feeds, fraction=params.holdout_fraction, seed=ctx.seed)
    batches = calibration_feeds(
        rest, samples=params.calibration_samples, batch=params.calibration_batch, seed=ctx.seed
    )
    source = {**source, "rows": n_rows(scored), "held_out_of": n_rows(feeds)}
    calibration_source = {
        "inputs": params.inputs,
        "rows": sum(n_rows(b) for b in batches),
        "note": f"the {n_rows(rest)} rows of the file the search does not score on",
    }
    return scored, source, batches, calibration_source


def _search(
    model: ModelArtifact, data: Dataset, params: OnnxQuantizeParams, ctx: StepContext
) -> StepOutput:
    feeds, source, calibration, calibration_source = search_rows(model, data, params, ctx)
    sizes, batching = deploy_batch_sizes(model.obj, feeds, wanted=params.batch_sizes, ctx=ctx)
    start = time.perf_counter()
    result = search_int8(
        model.obj,
        feeds=feeds,
        calibration=calibration,
        thresholds=params,
        meta=model.meta,
        workdir=ctx.workdir,
        budget=SearchBudget(
            max_excluded_nodes=params.max_excluded_nodes,
            max_sensitivity_nodes=params.max_sensitivity_nodes,
            max_trials=params.max_trials,
            max_seconds=params.max_search_s,
            latency_batch=params.latency_batch,
            latency_runs=params.latency_runs,
            threads=params.threads,
        ),
        batch_sizes=sizes,
        progress=report_progress,
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
        "batch_sizes": result.batch_sizes,
        "batching": batching,
        "stop_reason": result.stop_reason,
        "stopped": result.stopped,
        "skipped": result.skipped,
        "search_time_s": time.perf_counter() - start,
    }
    files = {
        "int8_search.json": json.dumps(
            {**summary, "trials": result.trials}, indent=2, default=str
        ).encode()
    }
    report = parity_report(result, params)
    if report is not None:
        # Passed or not, the user sees the numbers behind the verdict.
        report |= {"inputs": source, "batching": batching}
        files["parity_report.json"] = json.dumps(report, indent=2, default=str).encode()
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


def _stage_inputs(workspace: Path, path: Path, trust_pickle: bool) -> str:
    return stage_inputs_file(workspace, path)


def main(argv: list[str] | None = None) -> int:
    """`python -m modules.deployment.onnx_quantize --input-model m.onnx --output-model q.onnx`."""
    from modules.pipeline.script import FileOption, ScriptOptions, script_main

    files = {
        "inputs": FileOption(
            "--inputs", _stage_inputs, ".npz with one array per graph input (see `inputs`)."
        ),
        "calibration_inputs": FileOption(
            "--calibration-inputs", _stage_inputs, ".npz to calibrate on (see `inputs`)."
        ),
    }
    return script_main("onnx_quantize", argv, ScriptOptions(files=files))


if __name__ == "__main__":
    raise SystemExit(main())
