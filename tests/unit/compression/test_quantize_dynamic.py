import io

import pytest
import torch
from torch import nn

from modules.compression.quantize_dynamic import (
    QuantizeParams,
    int8_kernel,
    quantize_dynamic,
    quantize_linear_int8,
)
from modules.core.artifact import ModelArtifact
from modules.errors import BadInputError
from modules.pipeline.local import run_single_step
from modules.storage.architectures import build_model
from modules.storage.layers import Float16Linear, Int8Linear
from modules.storage.model_formats import load_model, save_model

META = {"in_features": 64, "num_classes": 10}


def linear_mlp() -> nn.Module:
    torch.manual_seed(0)
    return build_model({"name": "mlp", "in_features": 64, "hidden": [256, 256], "num_classes": 10})


def blob(model: nn.Module) -> bytes:
    return save_model(ModelArtifact("torch", model, dict(META)))


def test_int8_weights_round_trip_within_half_a_step():
    torch.manual_seed(0)
    linear = nn.Linear(32, 16)
    q = quantize_linear_int8(linear)
    assert q.weight.dtype == torch.int8 and q.scale.shape == (16,)
    dequantized = q.weight.float() * q.scale[:, None]
    error = (dequantized - linear.weight.detach()).abs()
    assert bool((error <= q.scale[:, None] / 2 + 1e-7).all())
    x = torch.rand(8, 32)
    torch.testing.assert_close(q(x), linear(x), atol=0.02, rtol=0.05)


def test_int8_file_is_smaller_and_loads_weights_only():
    model = linear_mlp()
    quantized, layers = quantize_dynamic(model, dtype="int8")
    assert layers == ["0", "2", "4"]
    assert all(isinstance(quantized[i], Int8Linear) for i in (0, 2, 4))
    fp32, int8 = blob(model), blob(quantized)
    assert len(int8) < len(fp32) / 3.5
    state = torch.load(io.BytesIO(int8), weights_only=True)["state_dict"]
    assert state["2.weight"].dtype == torch.int8
    reloaded = load_model(int8, filename="q.pt").obj
    x = torch.rand(16, 64)
    torch.testing.assert_close(reloaded(x), quantized(x))
    # Labels barely move against the float model.
    agree = (quantized(x).argmax(1) == model(x).argmax(1)).float().mean()
    assert agree >= 0.9


def test_packed_kernel_and_dequantize_path_agree():
    quantized, _ = quantize_dynamic(linear_mlp())
    x = torch.rand(4, 64)
    layer = quantized[0]
    fallback = layer(x.clone().requires_grad_(True)).detach()  # grad-tracked input: dequantize
    torch.testing.assert_close(layer(x), fallback, atol=0.05, rtol=0.05)
    assert int8_kernel(quantized) != "none"


def test_float16_variant_halves_the_file():
    model = linear_mlp()
    half, _ = quantize_dynamic(model, dtype="float16")
    assert isinstance(half[0], Float16Linear) and half[0].weight.dtype == torch.float16
    assert len(blob(half)) < 0.55 * len(blob(model))
    x = torch.rand(8, 64)
    out = load_model(blob(half), filename="h.pt").obj(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, model(x), atol=0.01, rtol=0.01)


def test_convolutions_stay_float32():
    cnn = build_model(
        {"name": "cnn", "in_channels": 1, "image_size": 8, "channels": [8], "num_classes": 10}
    )
    quantized, layers = quantize_dynamic(cnn)
    assert layers == ["7"]  # unflatten, conv, bn, relu, pool, avgpool, flatten, linear
    assert quantized[1].weight.dtype == torch.float32
    assert quantized(torch.rand(2, 64)).shape == (2, 10)


def test_model_without_linear_is_refused():
    convs = nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 10, 8), nn.Flatten())
    with pytest.raises(BadInputError, match="no nn.Linear layer"):
        quantize_dynamic(convs)


def test_params_reject_unknown_dtype():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="dtype"):
        QuantizeParams(dtype="int4")


def test_step_reports_size_ratio_and_accuracy(tmp_path):
    src = tmp_path / "in.pt"
    src.write_bytes(blob(linear_mlp()))
    out = tmp_path / "out.pt"
    record = run_single_step("quantize_dynamic", {}, input_path=src, output_path=out)
    m = record.metrics
    assert m["size_ratio"] == m["size_before_bytes"] / m["size_after_bytes"] > 3.5
    assert out.stat().st_size == record.output_size < record.input_size / 3.5
    assert m["label_agreement"] >= 0.9
    assert m["accuracy_drop_pt"] == pytest.approx(100 * (m["accuracy_before"] - m["accuracy"]))
    torch.load(out, weights_only=True)
