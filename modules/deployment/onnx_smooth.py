"""SmoothQuant on an ONNX graph: move activation outliers into the weights before int8.

Transformer activations carry a few channels whose magnitude is 10-100x the rest; one int8
scale per activation tensor then spends its range on those channels and rounds the others
away. SmoothQuant (Xiao et al., 2023) divides each input channel j of a linear layer's
activation by s_j and multiplies row j of its weight by s_j, which leaves X @ W unchanged:

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

with max|X_j| read off the calibration batches and max|W_j| over every weight that reads
the same activation (a transformer's Q, K and V projections share one, and one s serves
them all). alpha = 0 leaves activations as they are; 1 moves all their range into weights.

The 1/s goes into the node that produced the activation when that is a LayerNormalization
whose output feeds only these weights (a private copy of its scale and bias is divided by
s, so the graph gains no node), else into a new `Mul` in front of the weights, which the
quantizer then leaves in float (its input is the activation with the outliers). Only
MatMul and Gemm nodes whose weight is a 2-D initializer used nowhere else are smoothed.

ONNX Runtime's own `SmoothQuant` extra option imports neural-compressor 2.x
(`neural_compressor.adaptor.ox_utils`), which the 3.x releases no longer ship; this module
implements the same migration with numpy on the graph so that it works offline here.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from modules.errors import BadInputError

# Scales are clipped so a dead channel (max 0) or a huge outlier cannot produce inf or 0.
SCALE_MIN = 1e-4
SCALE_MAX = 1e4


@dataclass(frozen=True)
class _Reader:
    """A weighted node that reads activation `activation` through input 0."""

    node: Any
    weight: str
    # True when the weight is stored (out, in), as a Gemm with transB=1 keeps it.
    transposed: bool


def _attr(node: Any, name: str, default: int) -> int:
    for attribute in node.attribute:
        if attribute.name == name:
            return int(attribute.i)
    return default


def smoothable_groups(proto: Any) -> dict[str, list[_Reader]]:
    """Activation name -> the MatMul/Gemm nodes that read it against a private 2-D weight."""
    inits = {t.name: t for t in proto.graph.initializer}
    uses: dict[str, int] = defaultdict(int)
    for node in proto.graph.node:
        for name in node.input:
            uses[name] += 1
    groups: dict[str, list[_Reader]] = defaultdict(list)
    blocked: set[str] = set()
    for node in proto.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        activation, weight = node.input[0], node.input[1]
        if activation in inits:
            continue
        ok = weight in inits and len(inits[weight].dims) == 2 and uses[weight] == 1
        if node.op_type == "Gemm" and _attr(node, "transA", 0):
            ok = False
        if not ok:
            # One reader that cannot take the scale means the activation cannot be scaled.
            blocked.add(activation)
            continue
        transposed = node.op_type == "Gemm" and bool(_attr(node, "transB", 0))
        groups[activation].append(_Reader(node, weight, transposed))
    # Every consumer of a scaled activation must be a reader that takes the scale back.
    consumers: dict[str, int] = defaultdict(int)
    for node in proto.graph.node:
        for name in set(node.input):
            consumers[name] += 1
    outputs = {o.name for o in proto.graph.output}
    return {
        act: readers
        for act, readers in groups.items()
        if act not in blocked and act not in outputs and consumers[act] == len(readers)
    }


def activation_channel_max(
    proto: Any, names: list[str], calibration: list[dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Per-channel (last axis) max |value| of the named tensors over the calibration batches."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    if not calibration:
        raise BadInputError("SmoothQuant needs calibration batches")
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    present = {o.name for o in probe.graph.output}
    for name in names:
        if name not in present:
            probe.graph.output.append(helper.make_empty_tensor_value_info(name))
    options = ort.SessionOptions()
    # Unoptimized, so every named tensor still exists when the session runs.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        probe.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    wanted = {i.name for i in session.get_inputs()}
    maxima: dict[str, np.ndarray] = {}
    for batch in calibration:
        missing = sorted(wanted - set(batch))
        if missing:
            raise BadInputError(
                f"calibration batch lacks graph input(s) {missing}; it has {sorted(batch)}"
            )
        values = session.run(names, {k: v for k, v in batch.items() if k in wanted})
        for name, value in zip(names, values, strict=True):
            flat = np.abs(np.asarray(value, dtype=np.float32)).reshape(-1, value.shape[-1])
            peak = flat.max(axis=0)
            maxima[name] = peak if name not in maxima else np.maximum(maxima[name], peak)
    return maxima


def _weight_in_max(weight: np.ndarray, transposed: bool) -> np.ndarray:
    # Per input channel: rows of a (in, out) weight, columns of a (out, in) one.
    return np.abs(weight).max(axis=0 if transposed else 1)


def _scaled_weight(weight: np.ndarray, scale: np.ndarray, transposed: bool) -> np.ndarray:
    return weight * (scale[None, :] if transposed else scale[:, None])


def migration_scale(act_max: np.ndarray, weight_max: np.ndarray, *, alpha: float) -> np.ndarray:
    """s = max|X|^alpha / max|W|^(1 - alpha), 1 where a channel is dead, clipped."""
    act = act_max.astype(np.float64)
    wgt = weight_max.astype(np.float64)
    alive = (act > 0) & (wgt > 0)
    scale = np.ones_like(act)
    scale[alive] = act[alive] ** alpha / wgt[alive] ** (1.0 - alpha)
    return np.clip(scale, SCALE_MIN, SCALE_MAX).astype(np.float32)


def _fold_into_layernorm(proto: Any, activation: str, inv: np.ndarray) -> bool:
    """Divide the producing LayerNormalization's scale and bias by s; False if not possible."""
    from onnx import numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    producer = next((n for n in proto.graph.node if activation in n.output), None)
    if producer is None or producer.op_type != "LayerNormalization":
        return False
    if list(producer.output).index(activation) != 0 or _attr(producer, "axis", -1) != -1:
        return False
    # The exporter keeps one copy of equal initializers (every fresh LayerNorm's ones) and
    # hands it to the other nodes through Identity nodes.
    aliases = {
        n.output[0]: n.input[0]
        for n in proto.graph.node
        if n.op_type == "Identity" and n.input and n.input[0] in inits
    }
    slots = [(i, aliases.get(name, name)) for i, name in enumerate(producer.input) if i in (1, 2)]
    slots = [(i, name) for i, name in slots if name]
    for _, name in slots:
        if name not in inits or tuple(inits[name].dims) != (inv.shape[0],):
            return False
    taken = set(inits) | {o for n in proto.graph.node for o in n.output}
    for slot, name in slots:
        value = numpy_helper.to_array(inits[name]).astype(np.float32)
        # A private copy: the other users of a shared initializer must keep theirs.
        private = f"{name}_smooth"
        while private in taken:
            private += "_"
        taken.add(private)
        scaled = numpy_helper.from_array((value * inv).astype(np.float32), private)
        proto.graph.initializer.append(scaled)
        producer.input[slot] = private
    return True


def _insert_mul(proto: Any, activation: str, readers: list[_Reader], inv: np.ndarray) -> str:
    from onnx import helper, numpy_helper

    taken = {n.name for n in proto.graph.node} | {t.name for t in proto.graph.initializer}
    base = f"{activation}_smooth"
    name = base
    while name in taken:
        name += "_"
    proto.graph.initializer.append(numpy_helper.from_array(inv.astype(np.float32), f"{name}_inv"))
    mul = helper.make_node("Mul", [activation, f"{name}_inv"], [f"{name}_out"], name=name)
    # By name: the node objects of an earlier listing are copies once the list is rebuilt.
    reader_names = {r.node.name for r in readers}
    for node in proto.graph.node:
        if node.name in reader_names and node.input[0] == activation:
            node.input[0] = f"{name}_out"
    nodes = list(proto.graph.node)
    first = min(i for i, n in enumerate(nodes) if n.name in reader_names)
    nodes.insert(first, mul)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return name


def _drop_orphans(proto: Any, *, replaced: set[str]) -> None:
    # A folded LayerNorm reads its private copy; the original, now unread, would only add
    # bytes (and an ONNX Runtime warning per tensor).
    read = {name for node in proto.graph.node for name in node.input}
    read |= {o.name for o in proto.graph.output} | {i.name for i in proto.graph.input}
    keep = [t for t in proto.graph.initializer if t.name in read or t.name not in replaced]
    if len(keep) < len(proto.graph.initializer):
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(keep)


def smooth_graph(
    proto: Any, calibration: list[dict[str, np.ndarray]], *, alpha: float
) -> tuple[Any, dict[str, Any]]:
    """A copy of the graph with SmoothQuant scales migrated; returns (graph, what was done)."""
    import onnx
    from onnx import numpy_helper

    if not 0.0 <= alpha <= 1.0:
        raise BadInputError(f"SmoothQuant alpha must be within [0, 1], got {alpha}")
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    groups = smoothable_groups(out)
    if not groups:
        return out, {"smoothed_activations": 0, "folded": 0, "inserted_mul": [], "alpha": alpha}
    maxima = activation_channel_max(out, sorted(groups), calibration)
    inits = {t.name: t for t in out.graph.initializer}
    folded = 0
    inserted: list[str] = []
    peak_ratio = []
    for activation in sorted(groups):
        readers = groups[activation]
        weights = {r.weight: numpy_helper.to_array(inits[r.weight]) for r in readers}
        w_max = np.max([_weight_in_max(weights[r.weight], r.transposed) for r in readers], axis=0)
        act_max = maxima[activation]
        if act_max.shape != w_max.shape:
            continue  # a MatMul broadcasting over something other than channels: leave it
        scale = migration_scale(act_max, w_max, alpha=alpha)
        for reader in readers:
            new = _scaled_weight(weights[reader.weight], scale, reader.transposed)
            inits[reader.weight].CopyFrom(
                numpy_helper.from_array(new.astype(np.float32), reader.weight)
            )
        inv = (1.0 / scale).astype(np.float32)
        if _fold_into_layernorm(out, activation, inv):
            folded += 1
        else:
            inserted.append(_insert_mul(out, activation, readers, inv))
        mean = float(act_max.mean()) or 1.0
        peak_ratio.append(float(act_max.max()) / mean)
    _drop_orphans(out, replaced={t.name for t in proto.graph.initializer})
    return out, {
        "alpha": alpha,
        "smoothed_activations": folded + len(inserted),
        "folded": folded,
        # The quantizer must leave these in float: their input is the unsmoothed activation.
        "inserted_mul": inserted,
        "max_outlier_ratio_before": max(peak_ratio) if peak_ratio else None,
    }
