"""Bound what an untrusted ONNX graph can allocate, before any session runs it.

A valid 2.8 KB graph can ask ONNX Runtime for gigabytes (`ConstantOfShape` of a constant
3 * 2**28 shape) or hold a worker for ever (`Loop` with a trip count of 2**62). Before a graph
is accepted, shapes are inferred statically over its declared and constant shapes (onnx's
shape inference with data propagation, so `Shape` -> `Gather` -> `Concat` chains resolve), and:

- every tensor whose size is then known (symbolic dims counted as 1, their least) must fit
  the per-tensor cap: this catches growing ops and broadcast blow-ups alike;
- a growing op (ConstantOfShape, Expand, Tile, Range, Pad, OneHot, random generators,
  Resize/Upsample) must have outputs whose every dim is a number or a dim of the graph's own
  inputs (which the feeds bound); a dim that comes from tensor data cannot be bounded and is
  refused. Resize/Upsample by constant scales of at most MAX_RESIZE_FACTOR is accepted too;
- every `Loop` needs a constant trip count of at most the cap (a loop that only stops on its
  condition, or whose count is computed at run time, cannot be bounded).

The caps are arguments with these defaults; the run-time arena limit in
modules.evaluation.inference is the second line for what static analysis cannot see.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from modules.errors import UnsafeModelError

if TYPE_CHECKING:
    import onnx

# One tensor may hold at most this many bytes: above any real activation at batch 1 of the
# models this service compresses (the largest zoo layer output is under 10 MB).
MAX_TENSOR_BYTES = 1024**3
MAX_LOOP_TRIPS = 100_000
MAX_RESIZE_FACTOR = 64.0
# A constant read for its value (a shape, a trip count, scales) is small; larger ones are
# weights, never looked at here.
_MAX_CONSTANT_ELEMENTS = 64
GROWING_OPS = frozenset(
    {
        "ConstantOfShape",
        "Expand",
        "Tile",
        "Range",
        "Pad",
        "OneHot",
        "RandomNormal",
        "RandomUniform",
        "Multinomial",
        "Resize",
        "Upsample",
    }
)
_RESIZE_OPS = frozenset({"Resize", "Upsample"})
# The inputs of a growing op that set its output's size.
_SIZE_INPUTS: dict[str, tuple[int, ...]] = {
    "ConstantOfShape": (0,),
    "Expand": (1,),
    "Tile": (1,),
    "Range": (0, 1, 2),
    "Pad": (1,),
    "OneHot": (1,),
    "Resize": (1, 2, 3),
    "Upsample": (1,),
}
# Ops through which a value computed from the graph inputs' shapes stays one: exported
# graphs build sizes as Shape -> Gather -> Unsqueeze -> Concat (or -> Range for positions).
_SHAPE_OPS = frozenset(
    {
        "Shape",
        "Size",
        "Gather",
        "Slice",
        "Concat",
        "Unsqueeze",
        "Squeeze",
        "Cast",
        "Reshape",
        "Identity",
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Mod",
        "Floor",
        "Ceil",
        "Min",
        "Max",
        "Neg",
        "Abs",
        "ConstantOfShape",
        "Equal",
        "Where",
        "Not",
        "Greater",
        "Less",
        "GreaterOrEqual",
        "LessOrEqual",
        "Range",
        "ReduceProd",
    }
)
# A constant that sizes something from shapes stays within this (heads, a width, a stride).
MAX_SHAPE_FACTOR = 65_536


def check_onnx_bounds(
    model: onnx.ModelProto,
    *,
    max_tensor_bytes: int = MAX_TENSOR_BYTES,
    max_loop_trips: int = MAX_LOOP_TRIPS,
) -> None:
    """Refuse a graph whose allocations or loop trip counts exceed the caps or are unbounded."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(
            model, check_type=False, strict_mode=False, data_prop=True
        )
    except Exception as exc:  # onnx raises InferenceError, ValidationError, RuntimeError...
        raise UnsafeModelError(
            f"ONNX shape inference failed, so what the graph allocates cannot be bounded: "
            f"{' '.join(str(exc).split())[:300]}"
        ) from None
    graphs = list(_graphs(inferred.graph))
    shapes = _known_shapes(graphs)
    constants = _constants(graphs)
    bounded_params = {
        dim.dim_param
        for value in inferred.graph.input
        for dim in value.type.tensor_type.shape.dim
        if dim.dim_param
    }
    producer = {out: node for graph in graphs for node in graph.node for out in node.output}
    from_shapes = _shape_values(graphs, constants)
    for name, (elem_type, dims) in shapes.items():
        if dims is None:
            continue
        least = math.prod(d if isinstance(d, int) else 1 for d in dims)
        size = least * _itemsize(elem_type)
        if size > max_tensor_bytes:
            raise UnsafeModelError(
                f"ONNX tensor {name!r}{_made_by(producer.get(name))} would hold shape "
                f"{_show(dims)}: {size:,} bytes, over the {max_tensor_bytes:,}-byte cap"
            )
    for graph in graphs:
        for node in graph.node:
            if node.op_type == "Loop":
                _check_loop(node, constants, max_loop_trips)
            elif node.op_type in GROWING_OPS:
                _check_growing(node, shapes, constants, bounded_params, from_shapes)


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _graphs(attr.g)
            for sub in attr.graphs:
                yield from _graphs(sub)


Dims = tuple[int | str | None, ...] | None


def _known_shapes(graphs: list[onnx.GraphProto]) -> dict[str, tuple[int, Dims]]:
    """name -> (elem type, dims): int for a number, str for a symbol, None for unknown."""
    shapes: dict[str, tuple[int, Dims]] = {}
    for graph in graphs:
        for init in graph.initializer:
            shapes[init.name] = (init.data_type, tuple(int(d) for d in init.dims))
        for value in [*graph.input, *graph.value_info, *graph.output]:
            tensor = value.type.tensor_type
            if not value.type.HasField("tensor_type"):
                continue
            dims: Dims = None
            if tensor.HasField("shape"):
                dims = tuple(
                    int(d.dim_value)
                    if d.HasField("dim_value")
                    else (d.dim_param if d.dim_param else None)
                    for d in tensor.shape.dim
                )
            if value.name not in shapes or shapes[value.name][1] is None:
                shapes[value.name] = (tensor.elem_type, dims)
    return shapes


def _constants(graphs: list[onnx.GraphProto]) -> dict[str, Any]:
    """name -> numpy value of every small initializer and Constant node output."""
    from onnx import numpy_helper

    values: dict[str, Any] = {}
    for graph in graphs:
        for init in graph.initializer:
            if math.prod(init.dims) <= _MAX_CONSTANT_ELEMENTS:
                values[init.name] = numpy_helper.to_array(init)
        for node in graph.node:
            if node.op_type != "Constant" or not node.output:
                continue
            for attr in node.attribute:
                if attr.name == "value" and math.prod(attr.t.dims) <= _MAX_CONSTANT_ELEMENTS:
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
                elif attr.name == "value_int":
                    values[node.output[0]] = attr.i
                elif attr.name == "value_ints" and len(attr.ints) <= _MAX_CONSTANT_ELEMENTS:
                    values[node.output[0]] = list(attr.ints)
    return values


def _check_loop(node: onnx.NodeProto, constants: dict[str, Any], cap: int) -> None:
    import numpy as np

    where = f"ONNX Loop node {node.name or '(unnamed)'!r}"
    trip = node.input[0] if node.input else ""
    if not trip:
        raise UnsafeModelError(
            f"{where} has no trip count (it stops only on its condition), so its run time "
            "cannot be bounded"
        )
    if trip not in constants:
        raise UnsafeModelError(
            f"{where} takes its trip count {trip!r} from run-time data, so its run time "
            "cannot be bounded"
        )
    count = int(np.asarray(constants[trip]).reshape(-1)[0])
    if count > cap:
        raise UnsafeModelError(f"{where} runs {count:,} iterations, over the cap of {cap:,}")


def _check_growing(
    node: onnx.NodeProto,
    shapes: dict[str, tuple[int, Dims]],
    constants: dict[str, Any],
    bounded_params: set[str],
    from_shapes: set[str],
) -> None:
    sizes = [node.input[i] for i in _SIZE_INPUTS.get(node.op_type, ()) if i < len(node.input)]
    if sizes and all(not name or name in from_shapes for name in sizes):
        return  # sized by the inputs' shapes (bounded by the feeds) and small constants
    for out in node.output:
        if not out:
            continue
        dims = shapes.get(out, (0, None))[1]
        if dims is not None and all(
            isinstance(d, int) or (isinstance(d, str) and d in bounded_params) for d in dims
        ):
            continue
        if node.op_type in _RESIZE_OPS and _small_constant_scales(node, constants):
            continue
        raise UnsafeModelError(
            f"ONNX {node.op_type} node {node.name or '(unnamed)'!r}: the shape of its output "
            f"{out!r} ({_show(dims)}) depends on tensor data, so what it allocates cannot be "
            "bounded; give it constant sizes or sizes taken from the graph inputs' shapes"
        )


def _shape_values(graphs: list[onnx.GraphProto], constants: dict[str, Any]) -> set[str]:
    """Names whose values are computed only from tensor shapes and small constants."""
    import numpy as np

    # A constant seeds a size only when small: a large one bounds nothing by itself (a
    # constant-only size is checked through its inferred shape against the cap instead).
    known = {
        name
        for name, value in constants.items()
        if np.asarray(value).dtype.kind in "biuf"
        and np.all(np.abs(np.asarray(value, dtype=np.float64)) <= MAX_SHAPE_FACTOR)
    }
    for graph in graphs:
        for node in graph.node:  # topologically sorted, as the ONNX spec requires
            if node.op_type not in _SHAPE_OPS:
                continue
            given = [name for name in node.input if name]
            # A shape is as bounded as the tensor it describes.
            if node.op_type in ("Shape", "Size") or all(name in known for name in given):
                known.update(out for out in node.output if out)
    return known


def _small_constant_scales(node: onnx.NodeProto, constants: dict[str, Any]) -> bool:
    import numpy as np

    # Resize(X, roi, scales, sizes) from opset 11, Resize(X, scales) in opset 10, and
    # Upsample(X, scales): the scales are the last float input that is given.
    names = [n for n in node.input[1:] if n]
    scales = [np.asarray(constants[n]) for n in names if n in constants]
    floats = [s for s in scales if s.dtype.kind == "f" and s.size]
    if len(scales) != len(names) or not floats:
        return False
    factor = float(np.max(floats[-1]))
    return 0 < factor <= MAX_RESIZE_FACTOR


def _itemsize(elem_type: int) -> int:
    from onnx import helper

    try:
        return int(helper.tensor_dtype_to_np_dtype(elem_type).itemsize) or 8
    except (KeyError, TypeError, ValueError):
        return 8  # strings and unknown types: counted as a pointer each


def _made_by(node: onnx.NodeProto | None) -> str:
    return "" if node is None else f" (made by {node.op_type} node {node.name or '(unnamed)'!r})"


def _show(dims: Dims) -> str:
    if dims is None:
        return "unknown rank"
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"
