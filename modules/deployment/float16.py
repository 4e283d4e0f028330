"""The `onnx_float16` step: an ONNX graph computed in float16, with float32 inputs and outputs.

Every float32 initializer and Constant becomes float16, every float32 tensor of the graph
(value_info, Cast targets) becomes float16, and a Cast at each float32 graph input and output
keeps the model's signature: callers still feed and read float32. The file and the weights in
memory are half the size; ONNX Runtime's CPU provider has float16 kernels for the operators
of the MLPs and CNNs we export (MatMul, Gemm, Conv, Relu, pooling...). The converted graph is
opened in an ONNX Runtime session before it is returned, so a graph with an operator that has
no float16 kernel on this runtime is a failed verdict naming ORT's message, not a broken
artifact. Weights beyond float16's range (65504) are refused by name. Graphs that use another
operator domain (skl2onnx's `ai.onnx.ml` tree ensembles, linear classifiers) or subgraphs pass
through unchanged with a note, like `onnx_quantize` on a graph with nothing to quantize.

Accuracy is the parity gate's business (`onnx_parity` after this step).
"""

from __future__ import annotations

import copy
import time
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from modules.core.artifact import ModelArtifact
from modules.core.registry import register_step
from modules.core.step import StepContext, StepOutput, Verdict
from modules.deployment.onnx_export import onnx_artifact
from modules.storage.datasets import Dataset

FLOAT16_MAX = float(np.finfo(np.float16).max)


class Float16Error(ValueError):
    """The graph cannot be converted (a weight out of range)."""


class OnnxFloat16Params(BaseModel):
    """Params of the `onnx_float16` step."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_initializer_elements: int = Field(
        default=0,
        ge=0,
        le=1_000_000_000,
        description="Initializers with fewer elements than this stay float32 (a Cast widens "
        "them); 0 converts every float initializer.",
    )


def unsupported(proto: Any) -> str | None:
    """Why a graph is left as it is (None when it can be converted)."""
    domains = sorted({n.domain for n in proto.graph.node if n.domain not in ("", "ai.onnx")})
    if domains:
        return f"operators of domain(s) {domains} have no float16 types"
    if any(a.type in (5, 10) for n in proto.graph.node for a in n.attribute):  # GRAPH(S)
        return "the graph has subgraphs (If/Loop/Scan)"
    return None


def to_float16(proto: Any, *, min_elements: int = 0) -> tuple[Any, dict[str, Any]]:
    """A float16 copy of an ONNX graph with float32 inputs and outputs; and what changed."""
    from onnx import TensorProto, helper, numpy_helper

    out = copy.deepcopy(proto)
    graph = out.graph
    converted = kept = 0
    widen: list[Any] = []
    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT:
            continue
        arr = numpy_helper.to_array(init)
        if arr.size and float(np.abs(arr).max()) > FLOAT16_MAX:
            raise Float16Error(
                f"initializer {init.name!r} holds {float(np.abs(arr).max()):.4g}, beyond "
                f"float16's range ({FLOAT16_MAX:g})"
            )
        if arr.size < min_elements:
            # Stored float32; a Cast gives the float16 graph its value.
            kept += 1
            widen.append(helper.make_node("Cast", [init.name], [init.name + "__fp16"], to=10))
            continue
        init.CopyFrom(numpy_helper.from_array(arr.astype(np.float16), init.name))
        converted += 1
    renamed = {w.input[0]: w.output[0] for w in widen}
    for node in graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]
        for attr in node.attribute:
            if attr.name == "to" and node.op_type == "Cast" and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.FLOAT16
            if attr.type == attr.TENSOR and attr.t.data_type == TensorProto.FLOAT:
                arr = numpy_helper.to_array(attr.t).astype(np.float16)
                attr.t.CopyFrom(numpy_helper.from_array(arr, attr.t.name))
                converted += 1
    for vi in graph.value_info:
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT16
    initializers = {i.name for i in graph.initializer}
    head: list[Any] = list(widen)
    for vi in graph.input:
        if vi.name in initializers or vi.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        inner = vi.name + "__fp16"
        for node in graph.node:
            node.input[:] = [inner if name == vi.name else name for name in node.input]
        head.append(helper.make_node("Cast", [vi.name], [inner], to=TensorProto.FLOAT16))
    tail: list[Any] = []
    for vi in graph.output:
        if vi.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        inner = vi.name + "__fp16"
        for node in graph.node:
            node.output[:] = [inner if name == vi.name else name for name in node.output]
            node.input[:] = [inner if name == vi.name else name for name in node.input]
        tail.append(helper.make_node("Cast", [inner], [vi.name], to=TensorProto.FLOAT))
    nodes = head + list(graph.node) + tail
    del graph.node[:]
    graph.node.extend(nodes)
    return out, {"converted_tensors": converted, "kept_float32": kept}


@register_step("onnx_float16", params=OnnxFloat16Params, accepts={"onnx"}, gate=True)
def onnx_float16(
    model: ModelArtifact, data: Dataset, params: OnnxFloat16Params, ctx: StepContext
) -> StepOutput:
    """Convert an ONNX graph to float16 compute (float32 inputs and outputs kept)."""
    from modules.evaluation.inference import ort_session

    proto = model.obj
    size_before = proto.ByteSize()
    why = unsupported(proto)
    if why is not None:
        note = f"left as float32: {why}"
        return StepOutput(
            model=None, metrics={"converted": False, "note": note, "size_bytes_before": size_before}
        )
    start = time.perf_counter()
    try:
        converted, details = to_float16(proto, min_elements=params.min_initializer_elements)
        ort_session(converted.SerializeToString())
    except Float16Error as exc:
        reason = f"float16 conversion refused: {exc}"
        return StepOutput(
            model=None,
            metrics={"converted": False, "error": reason},
            verdict=Verdict(False, reason),
        )
    except Exception as exc:  # ORT raises its own types (NotImplemented, InvalidGraph, Fail)
        reason = f"ONNX Runtime cannot run the float16 graph: {type(exc).__name__}: {exc}"
        return StepOutput(
            model=None,
            metrics={"converted": False, "error": reason},
            verdict=Verdict(False, reason),
        )
    meta = {**model.meta, "float16": True}
    size_after = converted.ByteSize()
    metrics = {
        "converted": True,
        "size_bytes_before": size_before,
        "size_bytes_after": size_after,
        "compression_ratio": size_before / size_after if size_after else None,
        "convert_time_s": time.perf_counter() - start,
        **details,
    }
    reason = f"float16 compute: {size_before:,} -> {size_after:,} bytes"
    return StepOutput(
        model=onnx_artifact(converted, meta), metrics=metrics, verdict=Verdict(True, reason)
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m modules.deployment.float16 --input-model m.onnx --output-model h.onnx`."""
    from modules.pipeline.script import script_main

    return script_main("onnx_float16", argv)


if __name__ == "__main__":
    raise SystemExit(main())
