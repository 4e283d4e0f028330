import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from modules.deployment.float16 import OnnxFloat16Params, onnx_float16
from modules.deployment.onnx_export import OnnxExportParams, export_model
from modules.evaluation.inference import make_predictor
from modules.storage.model_formats import load_model, save_model


@pytest.fixture(scope="module")
def mlp_onnx(small_mlp, digits):
    artifact, _ = export_model(small_mlp, digits, OnnxExportParams())
    return artifact


def test_float16_halves_the_file_keeps_float32_io_and_agrees(
    mlp_onnx, small_mlp, digits, ctx_factory
):
    out = onnx_float16(mlp_onnx, digits, OnnxFloat16Params(), ctx_factory())
    m = out.metrics
    assert out.verdict.passed and m["converted"]
    assert 0.45 < m["size_bytes_after"] / m["size_bytes_before"] < 0.55
    graph = out.model.obj.graph
    assert {i.data_type for i in graph.initializer} == {TensorProto.FLOAT16}
    assert [i.type.tensor_type.elem_type for i in graph.input] == [TensorProto.FLOAT]
    assert [o.type.tensor_type.elem_type for o in graph.output] == [TensorProto.FLOAT]
    onnx.checker.check_model(out.model.obj)
    # The stored file passes the safe loader and predicts the labels of the float32 graph.
    back = load_model(save_model(out.model), filename="h.onnx")
    x = digits.X_test[:200]
    fp32 = make_predictor(mlp_onnx).labels(x)
    fp16 = make_predictor(back).labels(x)
    assert np.mean(fp32 == fp16) >= 0.99


def test_small_tensors_can_stay_float32(mlp_onnx, digits, ctx_factory):
    params = OnnxFloat16Params(min_initializer_elements=1000)  # the biases stay float32
    out = onnx_float16(mlp_onnx, digits, params, ctx_factory())
    kinds = {i.name: i.data_type for i in out.model.obj.graph.initializer}
    assert TensorProto.FLOAT in kinds.values() and TensorProto.FLOAT16 in kinds.values()
    assert out.metrics["kept_float32"] >= 1
    assert make_predictor(out.model).labels(digits.X_test[:10]).shape == (10,)


def test_a_weight_beyond_float16_range_is_refused_by_name(digits, ctx_factory):
    big = numpy_helper.from_array(np.full((64, 10), 1e6, np.float32), "too_big")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "too_big"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])],
        [big],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    from modules.core.artifact import ModelArtifact

    out = onnx_float16(ModelArtifact("onnx", proto, {}), digits, OnnxFloat16Params(), ctx_factory())
    assert out.model is None and not out.verdict.passed
    assert "too_big" in out.verdict.reason and "65504" in out.verdict.reason


def test_a_scikit_learn_graph_is_left_alone_with_a_note(small_knn, digits, ctx_factory):
    knn_onnx, _ = export_model(small_knn, digits, OnnxExportParams())
    out = onnx_float16(knn_onnx, digits, OnnxFloat16Params(), ctx_factory())
    assert out.model is None and out.metrics["converted"] is False
    assert "ai.onnx.ml" in out.metrics["note"]
