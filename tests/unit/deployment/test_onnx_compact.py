"""Compaction of quantized graphs: fewer bytes, the same outputs bit for bit."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from modules.core.artifact import ModelArtifact
from modules.deployment.onnx_compact import compact_graph
from modules.deployment.onnx_export import OnnxExportParams, export_model
from modules.deployment.onnx_int8 import (
    QuantSettings,
    calibration_feeds,
    prepare_graph,
    quantize_prepared,
)
from modules.storage.architectures import build_model, complete_arch


@pytest.fixture(scope="module")
def conv_net(digits):
    """A small zoo CNN (untrained: compaction is about bytes and bits, not accuracy)."""
    arch = complete_arch(
        {"name": "cnn", "channels": [8, 16]},
        in_features=64,
        num_classes=10,
        image_shape=(1, 8, 8),
    )
    torch.manual_seed(0)
    net = build_model(arch).eval()
    artifact = ModelArtifact("torch", net, {"arch": arch, "in_features": 64, "num_classes": 10})
    exported, _ = export_model(artifact, digits, OnnxExportParams())
    return exported.obj


def run(proto, x):
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {proto.graph.input[0].name: x})[0]


SETTINGS = [
    QuantSettings(mode="static", per_channel=True, activation_type="uint8"),
    QuantSettings(mode="static", per_channel=False, activation_type="uint8"),
    QuantSettings(mode="static", per_channel=True, activation_type="uint8", quant_format="qdq"),
    QuantSettings(mode="dynamic", per_channel=True),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: s.label())
def test_compaction_keeps_every_output_bit_and_shrinks_the_file(
    settings, conv_net, digits, tmp_path
):
    source, _ = prepare_graph(conv_net, tmp_path)
    calibration = calibration_feeds({"input": digits.X_train}, samples=64, batch=32, seed=0)
    plain, _ = quantize_prepared(
        source, settings, workdir=tmp_path, calibration=calibration, compact=False
    )
    small, details = quantize_prepared(source, settings, workdir=tmp_path, calibration=calibration)
    info = details["compaction"]
    assert info["compacted"] and info["size_bytes_after"] == small.ByteSize()
    assert small.ByteSize() < 0.93 * plain.ByteSize()
    onnx.checker.check_model(small)
    x = digits.X_test[:97]
    assert np.array_equal(run(plain, x), run(small, x))
    # The user-facing signature keeps its names; nothing for a reader only is left.
    assert [i.name for i in small.graph.input] == [i.name for i in plain.graph.input]
    assert [o.name for o in small.graph.output] == [o.name for o in plain.graph.output]
    assert not small.graph.value_info and not any(n.name for n in small.graph.node)
    assert not any(p.key.startswith("onnx.") for p in small.metadata_props)
    keys = [
        (t.data_type, tuple(t.dims), numpy_helper.to_array(t).tobytes())
        for t in small.graph.initializer
    ]
    assert len(keys) == len(set(keys)), "identical initializers are stored once"


def test_compaction_keeps_onnx_runtime_s_int8_fusions(conv_net, digits, tmp_path):
    """ORT's optimized graph is the same before and after: no fusion is lost on the way."""
    source, _ = prepare_graph(conv_net, tmp_path)
    calibration = calibration_feeds({"input": digits.X_train}, samples=64, batch=32, seed=0)
    settings = QuantSettings(mode="static", per_channel=True, activation_type="uint8")
    optimized = {}
    for compact in (False, True):
        for quant_format in ("qdq", "qoperator"):
            q, _ = quantize_prepared(
                source,
                QuantSettings(**{**settings.__dict__, "quant_format": quant_format}),
                workdir=tmp_path,
                calibration=calibration,
                compact=compact,
            )
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
            path = tmp_path / f"opt-{compact}-{quant_format}.onnx"
            options.optimized_model_filepath = str(path)
            ort.InferenceSession(q.SerializeToString(), options, providers=["CPUExecutionProvider"])
            ops = sorted(n.op_type for n in onnx.load(str(path)).graph.node)
            optimized[compact, quant_format] = ops
    for quant_format in ("qdq", "qoperator"):
        assert optimized[True, quant_format] == optimized[False, quant_format]
        assert "QLinearConv" in optimized[True, quant_format]


def _conv_graph(*, zero_points: np.ndarray) -> onnx.ModelProto:
    """x -> QuantizeLinear -> QLinearConv (per-channel) -> DequantizeLinear, plus a twin scale."""
    rng = np.random.default_rng(0)
    w = rng.integers(-100, 100, size=(4, 2, 3, 3), dtype=np.int8)
    inits = [
        numpy_helper.from_array(np.float32(0.02), "x_scale"),
        numpy_helper.from_array(np.uint8(128), "x_zp"),
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(np.array([0.01, 0.02, 0.03, 0.04], np.float32), "w_scale"),
        numpy_helper.from_array(zero_points, "w_zp"),
        numpy_helper.from_array(np.float32(0.02), "y_scale_twin_of_x_scale"),
        numpy_helper.from_array(np.uint8(128), "y_zp"),
        numpy_helper.from_array(np.array([5, -5, 0, 7], np.int32), "bias"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"], name="q"),
        helper.make_node(
            "QLinearConv",
            [
                *("xq", "x_scale", "x_zp", "w", "w_scale", "w_zp"),
                *("y_scale_twin_of_x_scale", "y_zp", "bias"),
            ],
            ["yq"],
            name="conv",
            doc_string="a node doc string",
            dilations=[1, 1],
            strides=[1, 1],
            group=1,
            kernel_shape=[3, 3],
            pads=[1, 1, 1, 1],
        ),
        helper.make_node("DequantizeLinear", ["yq", "y_scale_twin_of_x_scale", "y_zp"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 5, 5])],
        inits,
        doc_string="a graph doc string",
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(proto)
    return proto


def test_defaults_twins_and_zero_points_go_and_pads_stay():
    proto = _conv_graph(zero_points=np.zeros(4, np.int8))
    x = np.random.default_rng(1).normal(size=(3, 2, 5, 5)).astype(np.float32)
    before = run(proto, x)
    info = compact_graph(proto)
    assert np.array_equal(before, run(proto, x))
    conv = next(n for n in proto.graph.node if n.op_type == "QLinearConv")
    # dilations/strides of 1, group 1 and a kernel_shape the weight implies are defaults.
    assert [a.name for a in conv.attribute] == ["pads"]
    assert info["default_attributes_dropped"] == 4
    inits = {t.name: t for t in proto.graph.initializer}
    assert inits[conv.input[5]].dims == []  # the per-channel zeros became one scalar
    assert info["zero_points_scalar"] == 1 and info["duplicate_initializers"] == 2
    assert conv.input[1] == conv.input[6]  # the twin scale (and zero point) share one copy
    assert not conv.doc_string and not proto.graph.doc_string


def test_nonzero_zero_points_and_named_nodes_are_kept():
    zero_points = np.array([0, 1, 0, 0], np.int8)
    proto = _conv_graph(zero_points=zero_points)
    compact_graph(proto, keep_node_names={"conv"})
    conv = next(n for n in proto.graph.node if n.op_type == "QLinearConv")
    assert conv.name == "conv" and not any(n.name for n in proto.graph.node if n is not conv)
    inits = {t.name: t for t in proto.graph.initializer}
    assert np.array_equal(numpy_helper.to_array(inits[conv.input[5]]), zero_points)


def test_a_graph_with_subgraphs_is_left_alone():
    branch = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["out"])],
        "branch",
        [],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1])],
    )
    node = helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch)
    graph = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    before = proto.SerializeToString()
    assert compact_graph(proto)["compacted"] is False
    assert proto.SerializeToString() == before
