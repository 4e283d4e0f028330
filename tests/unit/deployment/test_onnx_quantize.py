import numpy as np
import pytest
from pydantic import ValidationError

from modules.deployment.onnx_export import OnnxExportParams, export_model
from modules.deployment.onnx_int8 import calibration_feeds
from modules.deployment.onnx_quantize import OnnxQuantizeParams, onnx_quantize
from modules.evaluation.inference import make_predictor
from modules.storage.model_formats import load_model, save_model


@pytest.fixture(scope="module")
def mlp_onnx(small_mlp, digits):
    artifact, _ = export_model(small_mlp, digits, OnnxExportParams())
    return artifact


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_int8_is_smaller_agrees_and_reloads(mode, mlp_onnx, small_mlp, digits, ctx_factory):
    out = onnx_quantize(mlp_onnx, digits, OnnxQuantizeParams(mode=mode), ctx_factory())
    m = out.metrics
    assert out.verdict.passed and m["quantized"] and m["int8_nodes"] > 0
    # int8 weights are a quarter of float32; scales and QDQ nodes add a little back.
    assert m["size_bytes_after"] < 0.6 * m["size_bytes_before"]
    if mode == "static":
        assert m["calibration_samples"] == 256
    # The stored file passes the safe loader (no stray operator domains) and keeps its meta.
    back = load_model(save_model(out.model), filename="q.onnx")
    assert back.meta["source_framework"] == "torch"
    assert back.meta["quantized"] == f"{mode}-int8"
    native = make_predictor(small_mlp).labels(digits.X_test)
    agreement = (make_predictor(back).labels(digits.X_test) == native).mean()
    assert agreement > 0.95


def test_graph_without_matmul_passes_through_with_a_note(digits, ctx_factory):
    from sklearn.ensemble import RandomForestClassifier

    from modules.core.artifact import ModelArtifact

    forest = RandomForestClassifier(n_estimators=3, random_state=0).fit(
        digits.X_train, digits.y_train
    )
    onnx_model, _ = export_model(ModelArtifact("sklearn", forest), digits, OnnxExportParams())
    out = onnx_quantize(onnx_model, digits, OnnxQuantizeParams(), ctx_factory())
    assert out.model is None and out.verdict is None
    assert out.metrics["quantized"] is False and "TreeEnsembleClassifier" in out.metrics["note"]


def test_calibration_comes_from_the_train_split_deterministically(digits):
    feeds = {"input": digits.X_train}
    a = calibration_feeds(feeds, samples=100, batch=32, seed=1)
    b = calibration_feeds(feeds, samples=100, batch=32, seed=1)
    assert [len(x["input"]) for x in a] == [32, 32, 32, 4]
    assert all(np.array_equal(x["input"], y["input"]) for x, y in zip(a, b, strict=True))
    rows = {r.tobytes() for r in digits.X_train}
    assert all(r.tobytes() in rows for batch in a for r in batch["input"])


@pytest.mark.parametrize(
    ("params", "needle"),
    [({"mode": "fp8"}, "mode"), ({"calibration_samples": 0}, "calibration_samples")],
)
def test_bad_params_are_named(params, needle):
    with pytest.raises(ValidationError, match=needle):
        OnnxQuantizeParams(**params)
