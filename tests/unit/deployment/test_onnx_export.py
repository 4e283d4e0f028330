import numpy as np
import onnx
import pytest
import torch
from pydantic import ValidationError

from modules.core.artifact import ModelArtifact
from modules.core.jobspec import parse_job_spec
from modules.deployment.onnx_export import (
    OnnxExportParams,
    export_model,
    onnx_export,
)
from modules.evaluation.inference import make_predictor
from modules.pipeline.local import LocalWorkspace
from modules.storage.model_formats import load_model, save_model


def test_torch_export_has_a_dynamic_batch_and_survives_save_load(small_mlp, digits, ctx_factory):
    out = onnx_export(small_mlp, digits, OnnxExportParams(), ctx_factory())
    assert out.verdict.passed and "onnx.checker passed" in out.verdict.reason
    proto = out.model.obj
    assert {o.domain: o.version for o in proto.opset_import}[""] >= 17
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # dynamic batch axis
    back = load_model(save_model(out.model), filename="m.onnx")
    assert back.meta["source_framework"] == "torch" and back.meta["in_features"] == 64
    predictor = make_predictor(back)
    for n in (1, 7, 450):
        probs = predictor.scores(digits.X_test[:n])
        assert probs.shape == (n, 10) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    native = make_predictor(small_mlp).scores(digits.X_test)
    assert np.abs(predictor.scores(digits.X_test) - native).max() < 1e-4


def test_sklearn_export_without_zipmap(small_knn, digits, ctx_factory):
    out = onnx_export(small_knn, digits, OnnxExportParams(), ctx_factory())
    assert out.verdict.passed
    outputs = [o.name for o in out.model.obj.graph.output]
    assert outputs == ["label", "probabilities"]  # a tensor, not a ZipMap of dicts
    assert out.metrics["float32_label_flips"] == 0 and out.metrics["precision"] == "float32"
    labels = make_predictor(out.model).labels(digits.X_test)
    assert (labels == small_knn.obj.predict(digits.X_test)).all()


def test_float64_on_request(small_knn, digits):
    artifact, info = export_model(small_knn, digits, OnnxExportParams(precision="float64"))
    assert info["precision"] == "float64" and artifact.meta["precision"] == "float64"
    assert artifact.obj.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.DOUBLE


class _Spectrum(torch.nn.Module):
    """Uses an FFT, which has no ONNX symbolic at opset 17."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(64, 64)

    def forward(self, x):
        return torch.fft.rfft(self.fc(x)).real[:, :10]


def test_unexportable_torch_model_is_a_rejected_verdict_not_a_crash(digits, ctx_factory):
    model = ModelArtifact("torch", _Spectrum(), {"in_features": 64})
    out = onnx_export(model, digits, OnnxExportParams(), ctx_factory())
    assert out.model is None and not out.verdict.passed
    assert out.verdict.reason.startswith("ONNX export of the torch model failed")
    # The exporter's own message names the operator.
    assert "aten::fft_rfft" in out.verdict.reason and "not supported" in out.verdict.reason
    assert out.metrics["exported"] is False


@pytest.fixture
def label_spreading_step():
    """A throwaway first step producing an estimator skl2onnx has no converter for."""
    from sklearn.semi_supervised import LabelSpreading

    from modules.core.registry import register_step, unregister_step
    from modules.core.step import StepOutput

    @register_step("t_label_spreading", params=OnnxExportParams, accepts={"none"})
    def fit_label_spreading(model, data, params, ctx):
        """Fit LabelSpreading on a slice of the train split."""
        est = LabelSpreading(max_iter=50).fit(data.X_train[:300], data.y_train[:300])
        return StepOutput(model=ModelArtifact("sklearn", est))

    yield "t_label_spreading"
    unregister_step("t_label_spreading")


def test_failed_export_ends_the_job_rejected_with_the_converters_message(
    tmp_path, label_spreading_step
):
    spec = parse_job_spec(
        {
            "job_id": "exp1",
            "steps": [
                {"name": label_spreading_step},
                {"name": "onnx_export"},
                {"name": "onnx_parity"},
            ],
        }
    )
    ws = LocalWorkspace(tmp_path)
    result = ws.run(spec)
    assert result.status == "REJECTED"
    assert "step 1 (onnx_export) rejected" in result.reason
    assert "skl2onnx could not convert LabelSpreading" in result.reason
    assert "shape calculator" in result.reason  # skl2onnx's own words
    assert ws.jobs.get("exp1").status == "REJECTED"
    assert len(result.records) == 2  # parity never ran


@pytest.mark.parametrize(
    ("params", "needle"), [({"opset": 13}, "opset"), ({"precision": "x"}, "precision")]
)
def test_bad_params_are_named(params, needle):
    with pytest.raises(ValidationError, match=needle):
        OnnxExportParams(**params)
