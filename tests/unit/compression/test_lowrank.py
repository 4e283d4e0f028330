import io

import pytest
import torch
from torch import nn

from modules.compression.lowrank import (
    energy_rank,
    factorize_conv,
    lowrank_factorize,
    ratio_rank,
)
from modules.core.artifact import ModelArtifact
from modules.errors import BadInputError
from modules.pipeline.local import run_single_step
from modules.storage.architectures import build_model
from modules.storage.model_formats import load_model, save_model


def test_energy_rank_is_the_smallest_rank_reaching_the_threshold():
    s = torch.tensor([3.0, 2.0, 1.0, 0.5])  # s^2 = 9, 4, 1, 0.25; cumulative 0.632, 0.912, 0.982, 1
    assert energy_rank(s, 0.6) == 1
    assert energy_rank(s, 0.9) == 2
    assert energy_rank(s, 0.912) == 2
    assert energy_rank(s, 0.95) == 3
    assert energy_rank(s, 1.0) == 4
    with pytest.raises(BadInputError, match="energy"):
        energy_rank(s, 0.0)


def test_ratio_rank_rounds_up():
    assert ratio_rank(64, 0.25) == 16
    assert ratio_rank(10, 0.01) == 1
    assert ratio_rank(10, 0.33) == 4


def rank_k_linear(out_f: int, in_f: int, singular: list[float]) -> nn.Linear:
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(out_f, len(singular)))
    v, _ = torch.linalg.qr(torch.randn(in_f, len(singular)))
    linear = nn.Linear(in_f, out_f)
    with torch.no_grad():
        linear.weight.copy_(u @ torch.diag(torch.tensor(singular)) @ v.T)
    return linear


def test_linear_factorized_at_the_energy_rank_and_exact_for_low_rank_weights():
    # Singular values 4, 2, 1 (s^2 = 16, 4, 1 of 21): energy 0.9 needs rank 2, 0.99 rank 3.
    linear = rank_k_linear(48, 40, [4.0, 2.0, 1.0])
    model = nn.Sequential(linear)
    _, report = lowrank_factorize(model, energy=0.9)
    assert report[0]["rank"] == 2 and report[0]["replaced"]
    assert report[0]["energy_kept"] == pytest.approx(20 / 21, abs=1e-4)
    three, report = lowrank_factorize(model, energy=0.99)
    assert report[0]["rank"] == 3 and report[0]["weights_after"] == 3 * (40 + 48)
    first, second = three[0]
    assert (first.in_features, first.out_features, first.bias) == (40, 3, None)
    assert (second.in_features, second.out_features) == (3, 48)
    x = torch.randn(5, 40)
    torch.testing.assert_close(three(x), linear(x), atol=1e-4, rtol=1e-4)
    assert isinstance(model[0], nn.Linear)  # the input model is left alone


def test_layer_kept_when_factors_would_not_be_smaller():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 10))
    out, report = lowrank_factorize(model, energy=0.99)
    assert report[0]["replaced"] is False and "saves nothing" in report[0]["reason"]
    assert isinstance(out[0], nn.Linear)


def test_ratio_rule_sets_the_rank():
    torch.manual_seed(0)
    _, report = lowrank_factorize(nn.Sequential(nn.Linear(64, 32)), rule="ratio", ratio=0.25)
    assert report[0]["rank"] == 8 and report[0]["full_rank"] == 32


def test_conv_channel_decomposition_matches_a_low_rank_conv():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    with torch.no_grad():  # rank 4 when reshaped to 16 x 72
        conv.weight.copy_((torch.randn(16, 4) @ torch.randn(4, 72)).reshape(16, 8, 3, 3))
    pair = factorize_conv(conv, 4)
    assert [c.kernel_size for c in pair] == [(3, 3), (1, 1)]
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(pair(x), conv(x), atol=1e-3, rtol=1e-3)
    cnn = build_model(
        {"name": "cnn", "in_channels": 1, "image_size": 8, "channels": [32, 32], "num_classes": 10}
    )
    out, report = lowrank_factorize(cnn, energy=0.5, conv=True)
    assert any(r["type"] == "Conv2d" and r["replaced"] for r in report)
    assert out(torch.rand(2, 64)).shape == (2, 10)


def test_factorized_model_saves_and_loads_weights_only():
    torch.manual_seed(0)
    mlp = build_model({"name": "mlp", "in_features": 64, "hidden": [128], "num_classes": 10})
    out, _ = lowrank_factorize(mlp, rule="ratio", ratio=0.1)
    blob = save_model(ModelArtifact("torch", out, {}))
    torch.load(io.BytesIO(blob), weights_only=True)
    x = torch.rand(3, 64)
    torch.testing.assert_close(load_model(blob, filename="l.pt").obj(x), out(x))
    assert len(blob) < len(save_model(ModelArtifact("torch", mlp, {})))


def test_step_fine_tunes_and_reports_layers(tmp_path):
    torch.manual_seed(0)
    mlp = build_model({"name": "mlp", "in_features": 64, "hidden": [128], "num_classes": 10})
    src, out = tmp_path / "in.pt", tmp_path / "out.pt"
    src.write_bytes(save_model(ModelArtifact("torch", mlp, {})))
    record = run_single_step(
        "lowrank",
        {"rank_rule": "ratio", "ratio": 0.2, "finetune_epochs": 2},
        input_path=src,
        output_path=out,
    )
    m = record.metrics
    assert m["layers_replaced"] >= 1 and m["params_after"] < m["params_before"]
    assert out.stat().st_size == record.output_size < record.input_size
    assert m["size_after_bytes"] < m["size_before_bytes"]
    assert m["finetune"]["epochs"] == 2
