"""Compaction of a quantized ONNX graph: the same function in fewer bytes.

ONNX Runtime's quantizer writes what a reader of the graph needs and a runner does not: long
tensor names (`<weight>_quantized_scale`) repeated in every node that reads them, node
names, shape annotations of every intermediate tensor, doc strings, attributes spelled out
at their default value, one zero-point tensor per weight even when every zero point is 0,
and a scale or zero point per tensor where several hold the same values. On a small conv
net that is a fifth of the int8 file. `compact_graph` removes all of it:

* doc strings, the intermediate `value_info` and the quantizer's own metadata entries;
* node names (the quantizer's names say nothing the op type does not; `prepare_graph`
  names unnamed nodes again if the graph is quantized once more), but for the nodes the
  caller names (those a user asked to leave in float);
* attributes equal to the default their ONNX schema declares;
* duplicated initializers (same type, shape and bytes): one copy, read by every user;
* all-zero zero points: dropped where the input is optional and its absence means 0 of
  the same type (DequantizeLinear of int8 or int32 data, QuantizeLinear to uint8), made a
  single scalar where a QLinear op requires one (a scalar zero point is valid with
  per-channel scales);
* initializers nothing reads any more;
* every tensor that is neither a graph input nor a graph output renamed to a short name.

Graph inputs and outputs keep their names, every value keeps its bits: the compacted graph
computes exactly what the uncompacted one does (a unit test compares outputs bit for bit).
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Metadata the quantizer adds about its own intermediate files (pre-processing, inference).
QUANTIZER_METADATA = frozenset({"onnx.infer", "onnx.quant.pre_process"})
# Inputs (op type -> indices) that are zero points a QLinear op requires but also takes as
# a scalar with per-channel scales (the ONNX spec of QLinearConv; ORT's QGemm and
# QLinearMatMul insist on a zero point shaped like its scale, so they are not listed).
SCALAR_ZERO_POINTS: dict[str, tuple[int, ...]] = {"QLinearConv": (5,)}


# Attributes whose absence the ONNX spec defines as "1 (or 0) along each spatial axis", or
# as read off the weight (Conv's kernel_shape), which schemas cannot declare as a default.
SPATIAL_DEFAULTS: dict[str, dict[str, int | None]] = {
    op: {"dilations": 1, "strides": 1, "pads": 0, "kernel_shape": None}
    for op in ("Conv", "QLinearConv", "ConvInteger")
}
SPATIAL_DEFAULTS.update(
    {op: {"dilations": 1, "strides": 1, "pads": 0} for op in ("MaxPool", "AveragePool", "LpPool")}
)


def _spatial_default(node: Any, attribute: Any) -> bool:
    rule = SPATIAL_DEFAULTS.get(node.op_type, {})
    if attribute.name not in rule:
        return False
    auto_pad = next((a.s for a in node.attribute if a.name == "auto_pad"), b"NOTSET")
    if attribute.name == "pads" and auto_pad != b"NOTSET":
        return False  # pads next to SAME_* or VALID padding: leave the pair as it is
    value = rule[attribute.name]
    if value is None:
        # kernel_shape of a convolution: inferred from the weight's shape when absent.
        return True
    return attribute.type == 7 and all(v == value for v in attribute.ints)  # 7 = INTS


def _schema_defaults(op_type: str, domain: str, opset: int) -> dict[str, Any]:
    import onnx

    try:
        schema = onnx.defs.get_schema(op_type, opset, domain)
    except Exception:  # not an ONNX-registered op (ORT's contrib ops): keep its attributes
        return {}
    return {
        name: attr.default_value
        for name, attr in schema.attributes.items()
        if attr.default_value.type != 0
    }


def _drop_default_attributes(proto: Any) -> int:
    opsets = {entry.domain or "ai.onnx": entry.version for entry in proto.opset_import}
    version = opsets.get("ai.onnx")
    cache: dict[str, dict[str, Any]] = {}
    dropped = 0
    for node in proto.graph.node:
        # Only the default domain's schemas are known here; ORT's contrib ops keep theirs.
        if node.domain not in ("", "ai.onnx") or version is None:
            continue
        if node.op_type not in cache:
            cache[node.op_type] = _schema_defaults(node.op_type, "", version)
        defaults = cache[node.op_type]
        keep = []
        for attribute in node.attribute:
            default = defaults.get(attribute.name)
            same = (default is not None and _same_attribute(attribute, default)) or (
                _spatial_default(node, attribute)
            )
            dropped += same
            if not same:
                keep.append(attribute)
        if len(keep) < len(node.attribute):
            del node.attribute[:]
            node.attribute.extend(keep)
    return dropped


def _same_attribute(attribute: Any, default: Any) -> bool:
    from onnx import helper

    if attribute.type != default.type:
        return False
    value, base = helper.get_attribute_value(attribute), helper.get_attribute_value(default)
    if isinstance(value, float):
        # Attributes are float32: compare as stored, so 1e-5 equals its own default.
        return bool(np.float32(value) == np.float32(base))
    return bool(value == base)


def _array(tensor: Any) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(tensor)


def _dedupe_initializers(proto: Any, protected: set[str]) -> int:
    """Point every reader of a duplicated initializer at its first copy; returns the count."""
    first: dict[tuple[int, tuple[int, ...], bytes], str] = {}
    alias: dict[str, str] = {}
    for tensor in proto.graph.initializer:
        if tensor.name in protected:
            continue
        key = (tensor.data_type, tuple(tensor.dims), _array(tensor).tobytes())
        if key in first:
            alias[tensor.name] = first[key]
        else:
            first[key] = tensor.name
    if alias:
        for node in proto.graph.node:
            for i, name in enumerate(node.input):
                if name in alias:
                    node.input[i] = alias[name]
    return len(alias)


def _scalar_zero_points(proto: Any) -> int:
    """Replace all-zero per-channel zero points by one scalar where the op takes it."""
    from onnx import TensorProto, numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    taken = set(inits) | {o for n in proto.graph.node for o in n.output}
    scalars: dict[int, str] = {}
    changed = 0
    for node in proto.graph.node:
        for index in SCALAR_ZERO_POINTS.get(node.op_type, ()):
            tensor = inits.get(node.input[index]) if index < len(node.input) else None
            if tensor is None or not tensor.dims or np.any(_array(tensor)):
                continue
            if tensor.data_type not in scalars:
                name = f"zero_{TensorProto.DataType.Name(tensor.data_type).lower()}"
                while name in taken:
                    name += "_"
                taken.add(name)
                zero = np.zeros((), dtype=_array(tensor).dtype)
                proto.graph.initializer.append(numpy_helper.from_array(zero, name))
                scalars[tensor.data_type] = name
            node.input[index] = scalars[tensor.data_type]
            changed += 1
    return changed


def _drop_unread_initializers(proto: Any) -> int:
    graph = proto.graph
    read = {name for node in graph.node for name in node.input}
    read |= {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in read]
    dropped = len(graph.initializer) - len(keep)
    if dropped:
        del graph.initializer[:]
        graph.initializer.extend(keep)
    return dropped


def _short_name(index: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        index, rest = divmod(index, 36)
        out = digits[rest] + out
        if index == 0:
            return out


def _rename_tensors(proto: Any, protected: set[str]) -> int:
    graph = proto.graph
    names: dict[str, str] = {}
    counter = 0

    def short(name: str) -> str:
        nonlocal counter
        if not name or name in protected:
            return name
        if name not in names:
            candidate = _short_name(counter)
            counter += 1
            while candidate in protected:
                candidate = _short_name(counter)
                counter += 1
            names[name] = candidate
        return names[name]

    for tensor in graph.initializer:
        tensor.name = short(tensor.name)
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = short(name)
        for i, name in enumerate(node.output):
            node.output[i] = short(name)
    return len(names)


def compact_graph(proto: Any, *, keep_node_names: set[str] | None = None) -> dict[str, Any]:
    """Compact a quantized graph in place (see the module doc); returns what was done.

    keep_node_names: nodes whose names stay (the ones a user asked to leave in float).

    A graph with subgraphs (If, Loop, Scan) or functions is left as it is: their bodies read
    outer tensors by name, which a rename would have to follow into every body.
    """
    graph = proto.graph
    before = proto.ByteSize()
    if proto.functions or any(
        attribute.type in (5, 10) for node in graph.node for attribute in node.attribute
    ):
        # 5 = GRAPH, 10 = GRAPHS (onnx.AttributeProto.AttributeType).
        return {"compacted": False, "note": "graph has subgraphs or functions"}
    protected = {i.name for i in graph.input} | {o.name for o in graph.output}
    # ONNX's schema is proto2: an empty string that is set is still written, so clear it.
    proto.ClearField("doc_string")
    graph.ClearField("doc_string")
    del graph.value_info[:]
    keep_meta = [p for p in proto.metadata_props if p.key not in QUANTIZER_METADATA]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep_meta)
    kept = keep_node_names or set()
    for node in graph.node:
        node.ClearField("doc_string")
        if node.name not in kept:
            node.ClearField("name")
    for tensor in graph.initializer:
        tensor.ClearField("doc_string")
    stats = {
        "default_attributes_dropped": _drop_default_attributes(proto),
        "zero_points_scalar": _scalar_zero_points(proto),
        "duplicate_initializers": _dedupe_initializers(proto, protected),
    }
    stats["unread_initializers"] = _drop_unread_initializers(proto)
    stats["renamed_tensors"] = _rename_tensors(proto, protected)
    return {
        "compacted": True,
        "size_bytes_before": before,
        "size_bytes_after": proto.ByteSize(),
        **stats,
    }
