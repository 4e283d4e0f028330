import io
import math

import pytest
import torch
from torch import nn

from modules.compression.prune_structured import (
    PruneParams,
    check_structured_support,
    gradual_sparsity,
    magnitude_masks,
    prune_gradual,
    prune_structured,
    prune_unstructured,
    weight_sparsity,
)
from modules.compression.quantize_dynamic import quantize_dynamic
from modules.core.artifact import ModelArtifact
from modules.errors import BadInputError
from modules.pipeline.local import run_single_step
from modules.storage.arch_tree import module_to_tree
from modules.storage.architectures import build_model
from modules.storage.datasets import load_dataset
from modules.storage.model_formats import load_model, save_model

ARCHS = {
    "mlp": {"name": "mlp", "in_features": 64, "hidden": [64, 32], "num_classes": 10},
    "cnn": {
        "name": "cnn",
        "in_channels": 1,
        "image_size": 8,
        "channels": [16, 16],
        "num_classes": 10,
    },
    "resnet": {
        "name": "resnet",
        "in_channels": 1,
        "image_size": 8,
        "widths": [16, 32],
        "blocks": [1, 1],
        "num_classes": 10,
    },
}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def saved_size(model: nn.Module) -> int:
    return len(save_model(ModelArtifact("torch", model, {"in_features": 64, "num_classes": 10})))


@pytest.mark.parametrize("name", list(ARCHS))
def test_structured_pruning_shrinks_params_and_file_and_still_runs(name):
    torch.manual_seed(0)
    model = build_model(ARCHS[name])
    pruned = prune_structured(model, amount=0.5, in_features=64, importance="l2")
    assert n_params(pruned) < 0.6 * n_params(model)
    assert saved_size(pruned) < 0.7 * saved_size(model)
    x = torch.rand(5, 64)
    assert pruned(x).shape == (5, 10)
    # The original is untouched and the result reloads exactly through the safe loader.
    assert n_params(model) == n_params(build_model(ARCHS[name]))
    blob = save_model(ModelArtifact("torch", pruned.eval(), {}))
    torch.load(io.BytesIO(blob), weights_only=True)
    reloaded = load_model(blob, filename="p.pt").obj
    torch.testing.assert_close(reloaded(x), pruned.eval()(x))


def test_residual_adds_stay_consistent_and_channels_round_to_8():
    model = build_model({**ARCHS["resnet"], "widths": [32, 64]})
    pruned = prune_structured(model, amount=0.5, in_features=64, round_to=8)
    convs = [m for m in pruned.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.out_channels % 8 == 0 for c in convs)
    block = pruned[4]  # identity shortcut: conv2 must emit as many channels as the block gets
    assert block.conv2.out_channels == block.conv1.in_channels
    assert pruned(torch.rand(2, 64)).shape == (2, 10)


def test_unsupported_layer_is_named():
    model = build_model(ARCHS["mlp"])
    quantized, _ = quantize_dynamic(model)
    with pytest.raises(BadInputError, match=r"layer 0 \(Int8Linear\)"):
        prune_structured(quantized, amount=0.5, in_features=64)
    grouped = nn.Sequential(
        nn.Unflatten(1, (4, 4, 4)), nn.Conv2d(4, 8, 3, groups=2), nn.Flatten(), nn.Linear(32, 10)
    )
    with pytest.raises(BadInputError, match=r"layer 1: a grouped Conv2d \(groups=2\)"):
        check_structured_support(grouped)


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("amount", [0.3, 0.9])
def test_unstructured_sparsity_matches_amount(scope, amount):
    torch.manual_seed(1)
    model = build_model(ARCHS["cnn"])
    pruned, masks = prune_unstructured(model, amount=amount, scope=scope)
    assert weight_sparsity(pruned) == pytest.approx(amount, abs=0.01)
    assert weight_sparsity(model) == 0.0  # the input model is left alone
    # Masks are baked in: no reparametrisation hooks, the tree serialiser accepts it.
    module_to_tree(pruned)
    assert not any(m._forward_pre_hooks for m in pruned.modules())
    if scope == "layer":
        for name, mask in masks.items():
            assert 1 - mask.float().mean().item() == pytest.approx(amount, abs=0.01), name


def test_global_masks_rank_across_layers():
    scores = {"a": torch.tensor([1.0, 2.0, 3.0, 4.0]), "b": torch.tensor([10.0, 20.0, 30.0, 40.0])}
    masks = magnitude_masks(scores, amount=0.5, scope="global")
    assert masks["a"].tolist() == [False] * 4 and masks["b"].tolist() == [True] * 4
    with pytest.raises(BadInputError, match="amount"):
        magnitude_masks(scores, amount=1.0, scope="layer")


def test_gradual_schedule_matches_zhu_gupta_formula():
    kw = {"initial": 0.1, "final": 0.9, "start": 100, "frequency": 10, "n_events": 20}
    assert gradual_sparsity(0, **kw) == 0.1
    assert gradual_sparsity(100, **kw) == 0.1
    assert gradual_sparsity(300, **kw) == 0.9
    assert gradual_sparsity(1000, **kw) == 0.9
    # Halfway through the ramp: s_f + (s_i - s_f) * (1/2)**3.
    assert gradual_sparsity(200, **kw) == pytest.approx(0.9 + (0.1 - 0.9) * 0.125)
    assert gradual_sparsity(150, **kw) == pytest.approx(0.9 - 0.8 * (1 - 50 / 200) ** 3)
    values = [gradual_sparsity(t, **kw) for t in range(0, 400, 10)]
    assert values == sorted(values)


@pytest.mark.parametrize("importance", ["l1", "gradient"])
def test_gradual_pruning_reaches_the_final_sparsity_on_schedule(digits, importance):
    torch.manual_seed(0)
    model = build_model(ARCHS["mlp"])
    pruned, report = prune_gradual(
        model,
        digits,
        final=0.8,
        frequency=5,
        prune_epochs=2,
        finetune_epochs=1,
        importance=importance,
    )
    assert weight_sparsity(pruned) == pytest.approx(0.8, abs=0.01)
    steps = math.ceil(len(digits.y_train) / 64)
    assert report["n_events"] == (2 * steps) // 5
    kw = {"initial": 0.0, "final": 0.8, "start": 0, "frequency": 5, "n_events": report["n_events"]}
    for event in report["schedule"]:
        assert event["sparsity"] == pytest.approx(gradual_sparsity(event["step"], **kw))
    assert report["schedule"][-1]["sparsity"] == pytest.approx(0.8)


def test_gradual_refuses_a_ramp_with_no_pruning_step(digits):
    with pytest.raises(BadInputError, match="start_step=10000"):
        prune_gradual(build_model(ARCHS["mlp"]), digits, final=0.5, start=10_000, prune_epochs=1)


def test_params_reject_bad_amount_method_and_combinations():
    from pydantic import ValidationError

    for amount in (1.0, -0.1, 1.5):
        with pytest.raises(ValidationError, match="amount"):
            PruneParams(amount=amount)
    with pytest.raises(ValidationError, match="method"):
        PruneParams(method="random")
    with pytest.raises(ValidationError, match="'gradient' is for unstructured"):
        PruneParams(method="structured", importance="gradient")
    with pytest.raises(ValidationError, match="initial_sparsity"):
        PruneParams(method="gradual", amount=0.5, initial_sparsity=0.6)


@pytest.fixture(scope="module")
def mlp_file(tmp_path_factory, digits):
    from modules.training.train import TrainParams, train_baseline

    arch = {"name": "mlp", "hidden": [64, 64]}
    artifact, _ = train_baseline(TrainParams(model="mlp", arch=arch, epochs=5), digits, seed=0)
    path = tmp_path_factory.mktemp("prune") / "mlp.pt"
    path.write_bytes(save_model(artifact))
    return path


def test_structured_step_writes_a_smaller_weights_only_file(tmp_path, mlp_file):
    out = tmp_path / "out.pt"
    record = run_single_step(
        "prune_structured",
        {"amount": 0.5, "finetune_epochs": 2},
        input_path=mlp_file,
        output_path=out,
    )
    m = record.metrics
    # The file's size is the record's; the metrics count tensor bytes, the file adds a header.
    assert out.stat().st_size == record.output_size < record.input_size
    assert m["size_after_bytes"] < m["size_before_bytes"]
    assert m["size_after_bytes"] < record.output_size < m["size_after_bytes"] + 8192
    assert m["params_after"] < m["params_before"]
    assert m["widths"] == {"0": [64, 32], "2": [64, 32]}
    checkpoint = torch.load(out, weights_only=True)
    assert checkpoint["state_dict"]["0.weight"].shape == (32, 64)
    assert m["accuracy"] > 0.8


def test_unstructured_step_reports_dense_and_sparse_sizes(tmp_path, mlp_file):
    out = tmp_path / "out.pt"
    record = run_single_step(
        "prune_structured",
        {"method": "unstructured", "amount": 0.9, "scope": "global", "finetune_epochs": 1},
        input_path=mlp_file,
        output_path=out,
    )
    m = record.metrics
    assert m["weight_sparsity"] == pytest.approx(0.9, abs=0.01)  # fine-tuning kept the mask
    assert m["size_dense_bytes"] == m["size_after_bytes"] < out.stat().st_size
    assert m["size_csr_estimate_bytes"] < 0.35 * m["size_dense_bytes"]
    assert m["size_deflate_bytes"] < 0.5 * m["size_dense_bytes"]
    assert "dense" in m["size_note"] and "CSR" in m["size_note"]
    torch.load(out, weights_only=True)


def test_bad_amount_writes_nothing(tmp_path, mlp_file):
    out = tmp_path / "out.pt"
    with pytest.raises(BadInputError, match=r"amount=1\.2"):
        run_single_step("prune_structured", {"amount": 1.2}, input_path=mlp_file, output_path=out)
    assert not out.exists()
