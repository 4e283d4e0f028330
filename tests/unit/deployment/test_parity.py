import json

import numpy as np
import pytest
from onnx import numpy_helper
from pydantic import ValidationError

from modules.core.artifact import ModelArtifact
from modules.core.jobspec import parse_job_spec
from modules.core.registry import register_step, unregister_step
from modules.core.step import StepOutput
from modules.deployment.onnx_export import OnnxExportParams, export_model
from modules.deployment.parity import ParityParams, onnx_parity
from modules.deployment.parity_metrics import compare_predictions, parity_verdict
from modules.errors import BadInputError, IncompatibleError
from modules.pipeline.local import LocalWorkspace

FAST = {"runs": 3, "warmup": 1}
SMALL_MLP = {"model": "mlp", "arch": {"name": "mlp", "hidden": [32]}, "epochs": 8}


def test_compare_identical_and_flipped_scores():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    same = compare_predictions(probs, probs.copy())
    assert same["agreement"] == 1.0 and same["max_abs_prob_diff"] == 0.0
    assert same["mismatched_indices_sample"] == []
    flipped = probs.copy()
    flipped[[1, 3]] = flipped[[1, 3]][:, ::-1]
    diff = compare_predictions(probs, flipped, mismatch_sample=1)
    assert diff["agreement"] == 0.5 and diff["n_mismatched"] == 2
    assert diff["mismatched_indices_sample"] == [1]
    assert diff["max_abs_prob_diff"] == pytest.approx(0.6)


def test_verdict_needs_both_thresholds_and_states_the_numbers():
    result = {
        "agreement": 0.99,
        "n_mismatched": 1,
        "n_samples": 100,
        "max_abs_prob_diff": 0.2,
        "prob_diff_note": None,
    }
    ok = parity_verdict(result, ParityParams(min_agreement=0.98, max_prob_diff=0.5))
    assert ok.passed and "label agreement 0.9900 >= min 0.98" in ok.reason
    bad = parity_verdict(result, ParityParams(min_agreement=0.98, max_prob_diff=0.1))
    assert not bad.passed and "max |prob diff| 0.2 > max 0.1" in bad.reason
    low = parity_verdict(result, ParityParams(min_agreement=1.0, max_prob_diff=0.5))
    assert not low.passed and "(1 of 100 test samples differ)" in low.reason


def job(*steps):
    train = {"name": "train", "params": SMALL_MLP}
    return parse_job_spec({"job_id": "par", "steps": [train, *steps]})


def test_identical_predictions_pass_and_write_the_deployment_report(tmp_path):
    ws = LocalWorkspace(tmp_path)
    result = ws.run(
        job(
            {"name": "onnx_export"},
            {"name": "onnx_parity", "params": {"max_prob_diff": 1e-4, **FAST}},
        )
    )
    assert result.status == "COMPLETED", result.reason
    parity = result.records[-1]
    assert parity.verdict["passed"] and parity.metrics["agreement"] == 1.0
    assert parity.metrics["max_abs_prob_diff"] < 1e-4
    report = json.loads(ws.store.get_bytes(parity.files["deployment_report.json"]))
    assert report["agreement"] == 1.0 and report["mismatched_indices_sample"] == []
    assert report["opset"]["ai.onnx"] >= 17
    assert report["native"]["framework"] == "torch"
    assert report["native"]["key"] == result.records[0].output_key  # the trained model
    for side in ("native", "onnxruntime"):
        b1 = report["latency_ms"][side]["b1"]
        # runs is the minimum: timing goes on until the median's CI is tight or capped.
        assert b1["n"] >= 3 and b1["ci95"][0] <= b1["mean"] <= b1["ci95"][1]
    assert report["versions"]["onnxruntime"] != "absent" and report["versions"]["torch"]
    assert report["thresholds"] == {"min_agreement": 0.98, "max_prob_diff": 1e-4}


@pytest.fixture
def perturb_step():
    """A throwaway step that negates the weights of the ONNX graph's last Gemm."""

    @register_step("t_perturb", params=ParityParams, accepts={"onnx"})
    def perturb(model, data, params, ctx):
        """Change one weight tensor of the ONNX model."""
        proto = model.obj
        last_gemm = [n for n in proto.graph.node if n.op_type == "Gemm"][-1]
        init = next(i for i in proto.graph.initializer if i.name == last_gemm.input[1])
        init.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(init), init.name))
        return StepOutput(model=ModelArtifact("onnx", proto, dict(model.meta)))

    yield "t_perturb"
    unregister_step("t_perturb")


def test_perturbed_onnx_model_is_rejected_with_the_reason(tmp_path, perturb_step):
    ws = LocalWorkspace(tmp_path)
    result = ws.run(
        job(
            {"name": "onnx_export"},
            {"name": perturb_step},
            {"name": "onnx_parity", "params": FAST},
            {"name": "hardware_sim"},
        )
    )
    assert result.status == "REJECTED"
    assert "step 3 (onnx_parity) rejected: ONNX parity failed: label agreement" in result.reason
    assert "< min 0.98" in result.reason and "> max 0.05" in result.reason
    assert ws.jobs.get("par").status == "REJECTED"
    ran = [r.step for r in result.records]
    assert ran == ["train", "onnx_export", "t_perturb", "onnx_parity"]  # hardware_sim did not
    report = json.loads(ws.store.get_bytes(result.records[-1].files["deployment_report.json"]))
    assert report["passed"] is False and report["agreement"] < 0.5
    assert len(report["mismatched_indices_sample"]) == 20


def test_sklearn_parity_direct(small_knn, digits, ctx_factory):
    onnx_model, _ = export_model(small_knn, digits, OnnxExportParams())
    history = [{"step": "train", "output_key": "k", "output_framework": "sklearn"}]
    ctx = ctx_factory(history=history, models={"k": small_knn})
    out = onnx_parity(onnx_model, digits, ParityParams(**FAST), ctx)
    assert out.verdict.passed and out.metrics["agreement"] == 1.0
    assert "deployment_report.json" in out.files


def test_without_a_native_model_the_error_says_so(small_mlp, digits, ctx_factory):
    onnx_model, _ = export_model(small_mlp, digits, OnnxExportParams())
    with pytest.raises(IncompatibleError, match="needs an earlier torch model"):
        onnx_parity(onnx_model, digits, ParityParams(**FAST), ctx_factory())


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_min_agreement_outside_0_1_is_named(bad):
    with pytest.raises(ValidationError, match="min_agreement"):
        ParityParams(min_agreement=bad)
    with pytest.raises(BadInputError, match="min_agreement"):
        job({"name": "onnx_export"}, {"name": "onnx_parity", "params": {"min_agreement": bad}})


def test_a_job_that_starts_from_an_uploaded_model_compares_against_it(tmp_path, small_knn):
    from modules.storage.model_formats import save_model

    upload = tmp_path / "knn.skops"
    upload.write_bytes(save_model(small_knn))
    ws = LocalWorkspace(tmp_path / "ws")
    key = ws.import_model(upload, user_id="local")
    spec = parse_job_spec(
        {
            "job_id": "up",
            "model": key,
            "steps": [{"name": "onnx_export"}, {"name": "onnx_parity", "params": FAST}],
        }
    )
    result = ws.run(spec)
    assert result.status == "COMPLETED", result.reason
    report = json.loads(ws.store.get_bytes(result.records[-1].files["deployment_report.json"]))
    assert report["native"]["key"] == key and report["native"]["as"] == "input of the step"
