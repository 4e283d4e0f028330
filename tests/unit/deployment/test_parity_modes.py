"""Parity by output kind: embedding (cosine), regression (errors, R²) and labels, for BYO graphs."""

from __future__ import annotations

import io
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from sklearn.metrics import r2_score

from modules.core.artifact import ModelArtifact
from modules.deployment.parity import ParityParams, onnx_parity
from modules.deployment.parity_metrics import (
    GateThresholds,
    compare_outputs,
    cosine_rows,
    embedding_metrics,
    infer_output_kind,
    output_verdict,
    regression_metrics,
)
from modules.errors import BadInputError, IncompatibleError
from modules.storage.artifacts import LocalStore
from modules.storage.keys import inputs_key
from tests.text_encoder import text_encoder, text_encoder_inputs, text_encoder_onnx

FAST = {"runs": 2, "warmup": 0}


def rng_rows(rows: int = 50, width: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, width)).astype(np.float32)


# --- embedding ---------------------------------------------------------------------------------


def test_identical_embeddings_have_cosine_one_and_pass():
    emb = rng_rows()
    result = compare_outputs({"e": emb}, {"e": emb.copy()}, kind="embedding")
    assert result["min_cosine"] == pytest.approx(1.0)
    assert result["mean_cosine"] == pytest.approx(1.0) and result["max_abs_error"] == 0.0
    verdict = output_verdict(result, GateThresholds())
    assert verdict.passed and "min cosine 1.0000 >= min 0.99" in verdict.reason


def test_a_row_flipped_in_sign_fails_and_is_the_worst_row():
    emb = rng_rows()
    flipped = emb.copy()
    flipped[7] *= -1
    result = compare_outputs({"e": emb}, {"e": flipped}, kind="embedding", worst=3)
    assert result["min_cosine"] == pytest.approx(-1.0)
    assert result["worst_rows"][0]["row"] == 7 and result["worst_rows"][0]["cosine"] < -0.99
    assert result["mean_cosine"] == pytest.approx((49 - 1) / 50)
    verdict = output_verdict(result, GateThresholds())
    assert not verdict.passed
    assert (
        "min cosine -1.0000 < min 0.99" in verdict.reason and "worst row 7 of 50" in verdict.reason
    )


def test_cosine_of_zero_rows_and_scale_invariance():
    a = np.array([[0.0, 0.0], [1.0, 2.0], [1.0, 0.0]])
    b = np.array([[0.0, 0.0], [2.0, 4.0], [0.0, 0.0]])
    assert cosine_rows(a, b).tolist() == pytest.approx([1.0, 1.0, 0.0])


def test_an_abs_error_threshold_is_gated_only_when_set():
    emb = rng_rows()
    noisy = emb + 0.01
    result = embedding_metrics(emb, noisy)
    assert result["max_abs_error"] == pytest.approx(0.01, rel=1e-3)
    full = {"kind": "embedding", **result, "worst_output": "e", "n_samples": 50}
    assert output_verdict(full, GateThresholds()).passed
    strict = output_verdict(full, GateThresholds(max_abs_error=0.001))
    assert not strict.passed and "max abs error 0.01 > max 0.001" in strict.reason


# --- regression --------------------------------------------------------------------------------


def test_regression_metrics_match_numpy():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(40, 3)) * [1.0, 10.0, 0.1]
    out = ref + rng.normal(size=(40, 3)) * 0.05
    m = regression_metrics(ref, out)
    err = np.abs(ref - out)
    assert m["max_abs_error"] == pytest.approx(err.max())
    assert m["mean_abs_error"] == pytest.approx(err.mean())
    assert m["max_rel_error"] == pytest.approx(err.max() / np.abs(ref).max())
    per_column = 1 - ((ref - out) ** 2).sum(0) / ((ref - ref.mean(0)) ** 2).sum(0)
    assert m["r2"] == pytest.approx(per_column.mean())
    assert m["r2"] == pytest.approx(r2_score(ref, out))  # scikit-learn's uniform average
    assert m["r2_worst_column"] == int(per_column.argmin()) == 2  # the smallest-scale column
    assert m["worst_rows"][0]["row"] == int(err.max(axis=1).argmax())


def test_a_constant_reference_column_scores_one_only_when_matched():
    ref = np.column_stack([np.arange(5.0), np.full(5, 3.0)])
    assert regression_metrics(ref, ref)["r2"] == 1.0
    off = ref.copy()
    off[:, 1] += 0.5
    assert regression_metrics(ref, off)["r2"] == pytest.approx(0.5)  # (1 + 0) / 2


def test_regression_verdict_names_r2_and_relative_error():
    ref = np.linspace(0, 10, 30)[:, None]
    result = compare_outputs({"y": ref}, {"y": ref * 1.2}, kind="regression")
    verdict = output_verdict(result, GateThresholds(min_r2=0.99, max_rel_error=0.05))
    assert not verdict.passed
    assert "R²" in verdict.reason and "max rel error 0.2 > max 0.05" in verdict.reason


# --- labels, kinds, several outputs ---------------------------------------------------------------


def test_labels_mode_compares_probabilities_of_logits():
    logits = rng_rows(width=4)
    result = compare_outputs({"l": logits}, {"l": logits + 1.0}, kind="labels")
    # A constant shift leaves softmax unchanged: same labels, same probabilities.
    assert result["agreement"] == 1.0 and result["max_abs_prob_diff"] < 1e-6


@pytest.mark.parametrize(
    ("meta", "outputs", "kind"),
    [
        ({"source_framework": "torch"}, {"y": rng_rows(width=4)}, "labels"),
        ({}, {"p": np.full((5, 4), 0.25, np.float32)}, "labels"),
        ({}, {"label": np.zeros(5, np.int64), "p": rng_rows(5, 3)}, "labels"),
        ({}, {"y": rng_rows(width=1)}, "regression"),
        ({}, {"y": rng_rows(width=1)[:, 0]}, "regression"),
        ({}, {"emb": rng_rows(width=8)}, "embedding"),
    ],
    ids=["exported-classifier", "probabilities", "int-labels", "one-column", "flat", "vectors"],
)
def test_output_kind_is_inferred(meta, outputs, kind):
    assert infer_output_kind(meta, outputs)[0] == kind


def test_the_worst_of_several_outputs_is_named():
    a, b = rng_rows(seed=1), rng_rows(seed=2)
    bad = b.copy()
    bad[3] = -bad[3]
    result = compare_outputs({"a": a, "b": b}, {"a": a, "b": bad}, kind="embedding")
    assert result["worst_output"] == "b" and set(result["outputs"]) == {"a", "b"}
    assert result["outputs"]["a"]["min_cosine"] == pytest.approx(1.0)


def test_missing_or_reshaped_outputs_are_named():
    emb = rng_rows()
    with pytest.raises(IncompatibleError, match="no output 'e'"):
        compare_outputs({"e": emb}, {"other": emb}, kind="embedding")
    with pytest.raises(IncompatibleError, match=r"output 'e': reference shape \[50, 16\]"):
        compare_outputs({"e": emb}, {"e": emb[:, :8]}, kind="embedding")


# --- the onnx_parity step on bring-your-own graphs ------------------------------------------------


def linear_graph(weight: np.ndarray, *, out: str = "y") -> ModelArtifact:
    """x (batch, n) float -> x @ weight: a BYO regression graph without mcaas tags."""
    w = numpy_helper.from_array(weight.astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], [out])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", weight.shape[0]])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch", weight.shape[1]])],
        [w],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(proto)
    return ModelArtifact("onnx", proto, {})


def byo_history(reference: ModelArtifact) -> tuple[list[dict], dict]:
    """A job whose step 0 turned the uploaded graph `up` into `q`, the model under test."""
    record = {
        "step": "onnx_quantize",
        "index": 0,
        "input_key": "up",
        "input_framework": "onnx",
        "output_key": "q",
        "output_framework": "onnx",
    }
    return [record], {"up": reference}


def test_a_byo_regression_graph_is_compared_with_its_original(digits, ctx_factory):
    weight = np.random.default_rng(0).normal(size=(64, 1))
    original = linear_graph(weight)
    history, models = byo_history(original)
    same = onnx_parity(
        linear_graph(weight),
        digits,
        ParityParams(**FAST),
        ctx_factory(history=history, models=models),
    )
    assert same.verdict.passed and same.metrics["kind"] == "regression"
    assert same.metrics["r2"] == pytest.approx(1.0)
    report = json.loads(same.files["deployment_report.json"])
    assert report["reference"]["key"] == "up" and report["inputs"]["split"] == "test"
    assert report["thresholds"] == {"min_r2": 0.99, "max_rel_error": 0.05, "max_abs_error": None}

    drifted = onnx_parity(
        linear_graph(weight * 1.1),
        digits,
        ParityParams(**FAST),
        ctx_factory(history=history, models=models),
    )
    assert not drifted.verdict.passed and "max rel error" in drifted.verdict.reason
    report = json.loads(drifted.files["deployment_report.json"])
    assert report["worst_output"] == "y" and len(report["worst_rows"]) == 10
    assert report["latency_ms"]["reference"]["b1"]["n"] >= 2  # runs is the minimum


@pytest.fixture(scope="module")
def encoder():
    model = text_encoder(vocab_size=50, dim=16, heads=2, layers=1, ff_dim=32, max_len=12)
    return ModelArtifact("onnx", onnx.load_model_from_string(text_encoder_onnx(model)), {})


def stored_inputs(tmp_path, arrays: dict[str, np.ndarray]) -> LocalStore:
    store = LocalStore(tmp_path / "store")
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    store.put_bytes(inputs_key("tester", "enc"), buf.getvalue())
    return store


def test_a_byo_encoder_is_gated_on_cosine_over_an_inputs_file(
    encoder, digits, ctx_factory, tmp_path
):
    store = stored_inputs(tmp_path, text_encoder_inputs(rows=20, seq_len=10, vocab_size=50))
    history, models = byo_history(encoder)
    ctx = ctx_factory(history=history, models=models)
    ctx.read_bytes = store.get_bytes
    out = onnx_parity(encoder, digits, ParityParams(inputs="enc", **FAST), ctx)
    assert out.verdict.passed and out.metrics["kind"] == "embedding"
    assert out.metrics["min_cosine"] == pytest.approx(1.0, abs=1e-6)
    report = json.loads(out.files["deployment_report.json"])
    assert report["inputs"] == {"inputs": "enc", "rows": 20}
    assert [i["name"] for i in report["onnx"]["inputs"]] == ["input_ids", "attention_mask"]


def test_a_byo_encoder_without_an_inputs_file_is_refused(encoder, digits, ctx_factory):
    history, models = byo_history(encoder)
    with pytest.raises(BadInputError, match=r"input_ids \(int64 \[batch, seq\]\).*inputs file"):
        onnx_parity(
            encoder, digits, ParityParams(**FAST), ctx_factory(history=history, models=models)
        )


def test_inputs_that_do_not_fit_the_encoder_are_refused_by_name(
    encoder, digits, ctx_factory, tmp_path
):
    arrays = text_encoder_inputs(rows=4, seq_len=10, vocab_size=50)
    store = stored_inputs(
        tmp_path, {"input_ids": arrays["input_ids"], "mask": arrays["attention_mask"]}
    )
    history, models = byo_history(encoder)
    ctx = ctx_factory(history=history, models=models)
    ctx.read_bytes = store.get_bytes
    with pytest.raises(IncompatibleError, match="model input 'attention_mask' is missing"):
        onnx_parity(encoder, digits, ParityParams(inputs="enc", **FAST), ctx)


def test_an_inputs_param_must_look_like_an_id():
    with pytest.raises(ValueError, match="invalid inputs id"):
        ParityParams(inputs="../../etc/passwd")


def test_the_native_labels_report_also_names_worst_rows_and_output(small_mlp, digits, ctx_factory):
    from modules.deployment.onnx_export import OnnxExportParams, export_model

    onnx_model, _ = export_model(small_mlp, digits, OnnxExportParams())
    history = [{"step": "train", "output_key": "m", "output_framework": "torch"}]
    ctx = ctx_factory(history=history, models={"m": small_mlp})
    out = onnx_parity(onnx_model, digits, ParityParams(worst_rows=3, **FAST), ctx)
    report = json.loads(out.files["deployment_report.json"])
    assert report["worst_output"] == "logits" and len(report["worst_rows"]) == 3
    assert report["worst_rows"][0]["max_abs_prob_diff"] < 1e-4  # an fp32 export
