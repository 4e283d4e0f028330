"""Static calibrated int8 (QDQ, per-channel, MinMax/entropy/percentile) and SmoothQuant."""

from __future__ import annotations

import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from pydantic import ValidationError

from modules.core.artifact import ModelArtifact
from modules.deployment.onnx_export import OnnxExportParams, export_model
from modules.deployment.onnx_int8 import (
    QuantSettings,
    calibration_feeds,
    prepare_graph,
    quantize_prepared,
)
from modules.deployment.onnx_quantize import OnnxQuantizeParams, onnx_quantize
from modules.deployment.onnx_smooth import migration_scale, smooth_graph
from modules.deployment.parity_metrics import cosine_rows
from modules.deployment.quantize_static import QuantizeStaticParams, quantize_static
from modules.errors import BadInputError, IncompatibleError
from modules.evaluation.inference import make_predictor
from modules.storage.architectures import build_model, complete_arch
from modules.storage.artifacts import LocalStore
from modules.storage.datasets import load_dataset
from modules.storage.keys import inputs_key
from modules.storage.model_formats import load_model, save_model
from modules.training.train import TrainParams, train_baseline
from tests.text_encoder import text_encoder, text_encoder_inputs, text_encoder_onnx

ENCODER = {"vocab_size": 200, "dim": 32, "heads": 4, "layers": 2, "ff_dim": 64, "max_len": 24}


@pytest.fixture(scope="module")
def small_cnn(digits):
    params = TrainParams(model="cnn", arch={"name": "cnn", "channels": [16, 32]}, epochs=3)
    artifact, _ = train_baseline(params, digits, seed=0)
    return artifact


@pytest.fixture(scope="module")
def mlp_onnx(small_mlp, digits):
    artifact, _ = export_model(small_mlp, digits, OnnxExportParams())
    return artifact


@pytest.fixture(scope="module")
def encoder():
    """An encoder with function-preserving outlier channels, its ONNX graph and token rows."""
    model = text_encoder(**ENCODER, channel_spread=1.0)
    proto = onnx.load_model_from_string(text_encoder_onnx(model))
    rows = text_encoder_inputs(rows=48, seq_len=24, vocab_size=ENCODER["vocab_size"], seed=1)
    calibration_rows = text_encoder_inputs(
        rows=64, seq_len=24, vocab_size=ENCODER["vocab_size"], seed=2
    )
    calibration = calibration_feeds(calibration_rows, samples=64, batch=32, seed=0)
    return proto, rows, calibration


def run_graph(proto, feeds):
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def conv_weights_are_int8(proto) -> bool:
    """Every convolution reads an int8 weight: a QLinearConv's own, or a Conv's through a
    DequantizeLinear (QDQ); no float Conv is left."""
    producers = {o: n for n in proto.graph.node for o in n.output}
    inits = {t.name: t for t in proto.graph.initializer}
    convs = [n for n in proto.graph.node if n.op_type in ("Conv", "QLinearConv")]
    for conv in convs:
        if conv.op_type == "QLinearConv":
            weight = conv.input[3]
        else:
            dq = producers.get(conv.input[1])
            if dq is None or dq.op_type != "DequantizeLinear":
                return False
            weight = dq.input[0]
        if inits[weight].data_type != onnx.TensorProto.INT8:
            return False
    return bool(convs)


def activation_zero_point_types(proto) -> set[int]:
    """Element types of the zero points of every QuantizeLinear (activations, in QDQ)."""
    inits = {t.name: t for t in proto.graph.initializer}
    nodes = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    return {inits[n.input[2]].data_type for n in nodes if len(n.input) > 2}


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_static_per_channel_mlp_is_smaller_and_agrees(
    method, mlp_onnx, small_mlp, digits, ctx_factory
):
    params = OnnxQuantizeParams(mode="static", per_channel=True, calibrate_method=method)
    out = onnx_quantize(mlp_onnx, digits, params, ctx_factory())
    m = out.metrics
    assert out.verdict.passed and m["calibrate_method"] == method
    assert m["calibration"] == {"dataset": "digits", "split": "train", "rows": 256}
    assert m["size_bytes_after"] < 0.6 * m["size_bytes_before"]
    ops = {n.op_type for n in out.model.obj.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    back = load_model(save_model(out.model), filename="q.onnx")
    native = make_predictor(small_mlp).labels(digits.X_test)
    assert (make_predictor(back).labels(digits.X_test) == native).mean() >= 0.97


def test_calibration_set_size_is_the_param(mlp_onnx, digits, ctx_factory):
    params = OnnxQuantizeParams(mode="static", calibration_samples=40, calibration_batch=16)
    out = onnx_quantize(mlp_onnx, digits, params, ctx_factory())
    assert out.metrics["calibration"]["rows"] == 40


@pytest.mark.parametrize("quant_format", ["qoperator", "qdq"])
def test_static_int8_on_the_zoo_cnn_passes_parity(quant_format, small_cnn, digits, ctx_factory):
    params = QuantizeStaticParams(quant_format=quant_format)
    out = quantize_static(small_cnn, digits, params, ctx_factory())
    assert out.verdict.passed, out.verdict.reason
    m = out.metrics
    assert m["conv_nodes"] == 2 and m["calibration"]["rows"] == 256
    assert m["quant_format"] == quant_format and m["compaction"]["compacted"]
    assert conv_weights_are_int8(out.model.obj)
    ops = {n.op_type for n in out.model.obj.graph.node}
    assert ("QLinearConv" in ops) == (quant_format == "qoperator")
    # uint8 activations with int8 weights: ONNX Runtime's fast x86 int8 path.
    assert activation_zero_point_types(out.model.obj) == {onnx.TensorProto.UINT8}
    assert m["compression_ratio"] > 1.5  # a tiny net: the int8 saving is diluted by scales
    back = load_model(save_model(out.model), filename="q.onnx")
    assert back.framework == "onnx" and back.meta["quantized"] == "static-int8"
    native = make_predictor(small_cnn).labels(digits.X_test)
    assert (make_predictor(back).labels(digits.X_test) == native).mean() >= 0.98


@pytest.mark.slow
def test_a_resnet18_shaped_net_gets_about_4x_smaller(digits, ctx_factory):
    arch = complete_arch(
        {"name": "resnet", "widths": [64, 128, 256, 512], "blocks": [2, 2, 2, 2]},
        in_features=64,
        num_classes=10,
        image_shape=(1, 8, 8),
    )
    torch.manual_seed(0)
    net = build_model(arch).eval()
    artifact = ModelArtifact("torch", net, {"arch": arch, "in_features": 64, "num_classes": 10})
    torch_bytes = len(save_model(artifact))
    params = QuantizeStaticParams(calibration_samples=32)
    out = quantize_static(artifact, digits, params, ctx_factory())
    assert out.verdict.passed and conv_weights_are_int8(out.model.obj)
    stored = len(save_model(out.model))
    assert torch_bytes > 44_000_000 and torch_bytes / stored >= 3.8
    fp32 = run_graph(
        export_model(artifact, digits, OnnxExportParams())[0].obj, {"input": digits.X_test}
    )
    int8 = run_graph(out.model.obj, {"input": digits.X_test})
    assert cosine_rows(fp32, int8).min() >= 0.98


def test_quantize_static_refuses_a_dataset_that_does_not_fit(small_cnn, ctx_factory):
    wine = load_dataset("wine")
    with pytest.raises(IncompatibleError, match="64 input features"):
        quantize_static(small_cnn, wine, QuantizeStaticParams(), ctx_factory())


def test_smoothing_keeps_the_function(encoder):
    proto, rows, calibration = encoder
    smoothed, info = smooth_graph(proto, calibration, alpha=0.5)
    # Per block: the Q/K/V input and the FF input fold into their LayerNorms; the attention
    # output and the GELU output get a Mul.
    assert info["folded"] == 4 and len(info["inserted_mul"]) == 4
    assert info["max_outlier_ratio_before"] > 3
    before, after = run_graph(proto, rows), run_graph(smoothed, rows)
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-5)
    changed = {t.name for t in smoothed.graph.initializer} - {
        t.name for t in proto.graph.initializer
    }
    assert changed  # private LayerNorm copies and the Mul scales
    onnx.checker.check_model(smoothed, full_check=True)


def test_smoothquant_recovers_precision_lost_to_outlier_channels(encoder, tmp_path):
    proto, rows, calibration = encoder
    source, _ = prepare_graph(proto, tmp_path)
    reference = run_graph(proto, rows)
    plain = QuantSettings(mode="dynamic", per_channel=True)
    smooth = QuantSettings(mode="dynamic", per_channel=True, smooth_alpha=0.5)
    q_plain, _ = quantize_prepared(source, plain, workdir=tmp_path, calibration=calibration)
    q_smooth, details = quantize_prepared(source, smooth, workdir=tmp_path, calibration=calibration)
    assert details["smooth_quant"]["smoothed_activations"] == 8
    # The inserted Muls stay float: their input is the activation with the outliers.
    inserted = set(details["smooth_quant"]["inserted_mul"])
    assert inserted <= {n.name for n in q_smooth.graph.node}
    error_plain = 1 - cosine_rows(reference, run_graph(q_plain, rows)).min()
    error_smooth = 1 - cosine_rows(reference, run_graph(q_smooth, rows)).min()
    assert error_smooth < 0.5 * error_plain
    # Migration costs a few float vectors per layer (scales, LayerNorm copies), nothing more.
    assert q_smooth.ByteSize() - q_plain.ByteSize() < 8 * 1024
    assert q_smooth.ByteSize() < proto.ByteSize()


def test_migration_scale_balances_and_leaves_dead_channels():
    act = np.array([100.0, 1.0, 0.0], np.float32)
    wgt = np.array([1.0, 1.0, 2.0], np.float32)
    scale = migration_scale(act, wgt, alpha=0.5)
    np.testing.assert_allclose(scale, [10.0, 1.0, 1.0], rtol=1e-6)
    # After migration the activation max and weight max of channel 0 meet at 10.
    assert act[0] / scale[0] == pytest.approx(wgt[0] * scale[0])


def test_smooth_alpha_without_calibration_rows_is_a_clear_error(mlp_onnx, tmp_path):
    source, _ = prepare_graph(mlp_onnx.obj, tmp_path)
    settings = QuantSettings(mode="dynamic", smooth_alpha=0.5)
    with pytest.raises(BadInputError, match="SmoothQuant needs calibration"):
        quantize_prepared(source, settings, workdir=tmp_path, calibration=None)


def test_a_calibration_file_with_the_wrong_input_names_is_refused(
    encoder, digits, ctx_factory, tmp_path
):
    proto, rows, _ = encoder
    ctx = ctx_factory()
    store = LocalStore(tmp_path / "store")
    buf = io.BytesIO()
    np.savez(buf, token_ids=rows["input_ids"], attention_mask=rows["attention_mask"])
    store.put_bytes(inputs_key(ctx.user_id, "calib"), buf.getvalue())
    ctx.read_bytes = store.get_bytes
    params = OnnxQuantizeParams(mode="static", calibration_inputs="calib")
    with pytest.raises(IncompatibleError, match="input_ids"):
        onnx_quantize(ModelArtifact("onnx", proto, {}), digits, params, ctx)


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"calibrate_method": "entropy"}, "needs mode=static"),
        ({"mode": "static", "calibrate_method": "kl"}, "calibrate_method"),
        ({"mode": "static", "percentile": 50}, "percentile"),
        ({"smooth_alpha": 1.5}, "smooth_alpha"),
        ({"mode": "static", "calibration_samples": 200_000}, "calibration_samples"),
    ],
)
def test_bad_static_params_are_named(params, needle):
    with pytest.raises(ValidationError, match=needle):
        OnnxQuantizeParams(**params)


@pytest.mark.parametrize(
    ("params", "needle"),
    [({"calibration_samples": 0}, "calibration_samples"), ({"opset": 12}, "opset")],
)
def test_bad_quantize_static_params_are_named(params, needle):
    with pytest.raises(ValidationError, match=needle):
        QuantizeStaticParams(**params)


def test_the_script_quantizes_a_torch_file_and_refuses_a_mismatched_dataset(
    small_cnn, tmp_path, capsys
):
    import json

    from modules.deployment.quantize_static import main

    model = tmp_path / "cnn.pt"
    model.write_bytes(save_model(small_cnn))
    out = tmp_path / "q.onnx"
    argv = ["--input-model", str(model), "--output-model", str(out)]
    assert main([*argv, "--calibration-samples", "64", "--calibrate-method", "percentile"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["verdict"]["passed"] and line["metrics"]["calibration"]["rows"] == 64
    back = load_model(out.read_bytes(), filename="q.onnx")
    assert back.meta["quantized"] == "static-int8" and conv_weights_are_int8(back.obj)

    bad_out = tmp_path / "bad.onnx"
    assert (
        main(["--input-model", str(model), "--output-model", str(bad_out), "--dataset", "wine"])
        == 2
    )
    assert "64 input features" in capsys.readouterr().err
    assert not bad_out.exists()  # nothing half-written
