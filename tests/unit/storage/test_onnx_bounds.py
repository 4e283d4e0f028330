"""The static ONNX allocation guard: hostile graphs refused by name, real exports accepted."""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper

from modules.errors import UnsafeModelError
from modules.storage.model_formats import load_model
from modules.storage.onnx_bounds import check_onnx_bounds
from tests.corpus.make_corpus import hostile_onnx_files, onnx_constant_of_shape, onnx_loop

HOSTILE = hostile_onnx_files()


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_graphs_are_refused_at_load_naming_the_node(name) -> None:
    _, data, refusal = HOSTILE[name]
    assert len(data) < 400_000  # each is a small, valid file
    onnx.checker.check_model(onnx.load_from_string(data))
    with pytest.raises(UnsafeModelError) as caught:
        load_model(data, filename="model.onnx")
    assert refusal in str(caught.value)


def test_the_3_gib_constant_of_shape_and_the_2_62_loop_are_tiny_files() -> None:
    assert len(HOSTILE["onnx_constant_of_shape.onnx"][1]) < 3000
    assert len(HOSTILE["onnx_loop_2_62.onnx"][1]) < 3000


def test_the_caps_are_arguments_and_small_constant_graphs_pass() -> None:
    small = onnx.load_from_string(onnx_constant_of_shape(1000))
    check_onnx_bounds(small)
    with pytest.raises(UnsafeModelError, match="4,000 bytes, over the 3,999-byte cap"):
        check_onnx_bounds(small, max_tensor_bytes=3999)
    loop = onnx.load_from_string(onnx_loop(10))
    check_onnx_bounds(loop)
    with pytest.raises(UnsafeModelError, match="runs 10 iterations, over the cap of 9"):
        check_onnx_bounds(loop, max_loop_trips=9)


def _model(nodes, inputs, outputs, initializer=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializer))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_sizes_taken_from_the_inputs_shapes_are_bounded() -> None:
    """ConstantOfShape(Shape(x)) and Range(0, seq): what exported masks and positions do."""
    x = helper.make_tensor_value_info("x", TensorProto.INT64, ["batch", "seq"])
    one = helper.make_tensor("one", TensorProto.INT64, [], [1])
    zero = helper.make_tensor("zero", TensorProto.INT64, [], [0])
    idx = helper.make_tensor("idx", TensorProto.INT64, [], [1])
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("ConstantOfShape", ["shape"], ["mask"]),
        helper.make_node("Gather", ["shape", "idx"], ["seq"]),
        helper.make_node("Range", ["zero", "seq", "one"], ["positions"]),
    ]
    outputs = [
        helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", "seq"]),
        helper.make_tensor_value_info("positions", TensorProto.INT64, [None]),
    ]
    check_onnx_bounds(_model(nodes, [x], outputs, [one, zero, idx]))


def test_a_shape_value_multiplied_by_a_huge_constant_is_not_a_bound() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])
    big = helper.make_tensor("big", TensorProto.INT64, [1], [2**40])
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Mul", ["shape", "big"], ["huge"]),
        helper.make_node("Expand", ["x", "huge"], ["y"]),
    ]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])
    with pytest.raises(UnsafeModelError, match="Expand node"):
        check_onnx_bounds(_model(nodes, [x], [y], [big]))


def test_resize_by_a_small_constant_scale_passes_and_by_a_huge_one_does_not() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "h", "w"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    for factor, ok in ((2.0, True), (1e6, False)):
        scales = helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, factor, factor])
        node = helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="nearest")
        model = _model([node], [x], [y], [scales])
        if ok:
            check_onnx_bounds(model)
        else:
            with pytest.raises(UnsafeModelError, match="Resize node"):
                check_onnx_bounds(model)


@pytest.mark.parametrize(
    "arch",
    [
        {"name": "mlp", "in_features": 64, "hidden": [32], "num_classes": 10},
        {"name": "cnn", "in_channels": 1, "image_size": 8, "channels": [8, 16], "num_classes": 10},
        {
            "name": "resnet",
            "in_channels": 1,
            "image_size": 8,
            "widths": [8, 16],
            "blocks": [1, 1],
            "num_classes": 10,
        },
    ],
    ids=lambda a: a["name"],
)
def test_exported_zoo_graphs_pass(arch) -> None:
    from modules.deployment.onnx_export import export_torch
    from modules.storage.architectures import build_model

    module = build_model(arch)
    proto = export_torch(module, in_features=64)
    assert load_model(proto.SerializeToString(), filename="m.onnx").framework == "onnx"


def test_exported_sklearn_and_encoder_graphs_pass() -> None:
    from sklearn.datasets import load_digits
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.neighbors import KNeighborsClassifier

    from modules.deployment.onnx_export import export_sklearn
    from tests.text_encoder import text_encoder, text_encoder_onnx

    x, y = load_digits(return_X_y=True)
    graphs = [
        export_sklearn(est.fit(x, y), in_features=64).SerializeToString()
        for est in (KNeighborsClassifier(3), RandomForestClassifier(5, random_state=0))
    ]
    model = text_encoder(vocab_size=40, dim=16, heads=2, layers=1, ff_dim=32, max_len=12)
    for data in [*graphs, text_encoder_onnx(model)]:
        assert load_model(data, filename="model.onnx").framework == "onnx"
