"""The parity gate judges a graph at the batch sizes it will be deployed with."""

from __future__ import annotations

import io
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from modules.core.artifact import ModelArtifact
from modules.deployment.onnx_quantize import OnnxQuantizeParams, quantize_onnx
from modules.deployment.parity import ParityParams, deploy_batch_sizes, onnx_parity
from modules.storage.artifacts import LocalStore
from modules.storage.keys import inputs_key

FAST = {"runs": 2, "warmup": 0}


def linear_embedding() -> onnx.ModelProto:
    """features (batch, 16) -> MatMul -> embedding (batch, 16), in float."""
    weight = np.random.default_rng(0).normal(size=(16, 16)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["features", "w"], ["embedding"], name="proj")],
        "linear",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 16])],
        [numpy_helper.from_array(weight, "w")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(proto)
    return proto


def outlier_rows(rows: int = 64) -> np.ndarray:
    """Ordinary rows with one huge row last: dynamic int8 scales each call by its max."""
    x = np.random.default_rng(1).normal(size=(rows, 16)).astype(np.float32)
    x[-1] *= 1000.0
    return x


@pytest.fixture
def batch_dependent(tmp_path, ctx_factory):
    """(dynamic int8 graph, ctx of a job that quantized the float graph, inputs id)."""
    original = linear_embedding()
    quantized, _ = quantize_onnx(original, params=OnnxQuantizeParams(), workdir=tmp_path)
    history = [
        {
            "step": "onnx_quantize",
            "index": 0,
            "input_key": "up",
            "input_framework": "onnx",
            "output_key": "q",
            "output_framework": "onnx",
        }
    ]
    ctx = ctx_factory(history=history, models={"up": ModelArtifact("onnx", original, {})})
    store = LocalStore(tmp_path / "store")
    buf = io.BytesIO()
    np.savez(buf, features=outlier_rows())
    store.put_bytes(inputs_key(ctx.user_id, "rows"), buf.getvalue())
    ctx.read_bytes = store.get_bytes
    return ModelArtifact("onnx", quantized, {"quantized": "dynamic-int8"}), ctx


def test_dynamic_int8_passes_one_row_per_call_and_fails_a_large_batch(batch_dependent, digits):
    model, ctx = batch_dependent
    alone = onnx_parity(model, digits, ParityParams(inputs="rows", batch_sizes=(1,), **FAST), ctx)
    assert alone.verdict.passed, alone.verdict.reason
    assert alone.metrics["min_cosine"] > 0.99
    both = onnx_parity(model, digits, ParityParams(inputs="rows", batch_sizes=(1, 64), **FAST), ctx)
    assert not both.verdict.passed
    assert "at 64 rows per call (worst of batch sizes 1, 64)" in both.verdict.reason
    by_batch = both.metrics["by_batch_size"]
    assert by_batch["b1"]["passed"] and not by_batch["b64"]["passed"]
    assert by_batch["b1"]["min_cosine"] == pytest.approx(alone.metrics["min_cosine"])
    # The headline numbers are the worst batch size's.
    assert both.metrics["batch_size"] == 64 and both.metrics["batch_sizes"] == [1, 64]
    assert both.metrics["min_cosine"] == by_batch["b64"]["min_cosine"] < 0.99
    report = json.loads(both.files["deployment_report.json"])
    assert report["batching"]["from"] == "the step's batch_sizes"
    assert set(report["by_batch_size"]) == {"b1", "b64"}


def test_the_default_checks_batch_one_and_the_profiles_auto_batch(batch_dependent, digits):
    model, ctx = batch_dependent
    out = onnx_parity(model, digits, ParityParams(inputs="rows", **FAST), ctx)
    report = json.loads(out.files["deployment_report.json"])
    batching = report["batching"]
    assert batching["from"] == "1 and the profile's auto-batch"
    assert "estimated for profile edge-8mb" in batching["auto_batch_from"]
    # A tiny graph fits thousands of rows in 8 MB; the 64 rows available cap it.
    assert batching["auto_batch"] >= 64 and "capped" in batching
    assert out.metrics["batch_sizes"] == [1, 64] and not out.verdict.passed


def test_an_earlier_hardware_sim_step_sets_the_auto_batch(batch_dependent, digits):
    model, ctx = batch_dependent
    ctx.history.append(
        {"step": "hardware_sim", "index": 1, "metrics": {"auto_batch": 8}, "output_key": None}
    )
    sizes, info = deploy_batch_sizes(model.obj, {"features": outlier_rows()}, wanted=None, ctx=ctx)
    assert sizes == [1, 8] and info["auto_batch_from"] == "step 1 (hardware_sim)"


def test_batch_sizes_are_validated():
    assert ParityParams(batch_sizes=(64, 1, 64)).batch_sizes == (1, 64)
    for bad in ((), (0,), (1, 70_000)):
        with pytest.raises(ValueError, match="batch_sizes"):
            ParityParams(batch_sizes=bad)
