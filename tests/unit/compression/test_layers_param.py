"""The `layers` param of prune_structured, lowrank and quantize_dynamic (per-layer control)."""

import json

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from modules.compression import lowrank, prune_structured, quantize_dynamic
from modules.compression.lowrank import LowRankParams, lowrank_factorize
from modules.compression.prune_structured import (
    PruneParams,
    _widths,
    prune_gradual,
    prune_unstructured,
    unstructured_layer_amounts,
)
from modules.compression.quantize_dynamic import QuantizeParams
from modules.core.artifact import ModelArtifact
from modules.errors import BadInputError
from modules.pipeline.local import run_single_step
from modules.storage.architectures import build_model
from modules.storage.datasets import load_dataset
from modules.storage.layers import Float16Linear, Int8Linear
from modules.storage.model_formats import save_model

MLP = {"name": "mlp", "in_features": 64, "hidden": [64, 32], "num_classes": 10}
CNN = {"name": "cnn", "in_channels": 1, "image_size": 8, "channels": [8, 16], "num_classes": 10}


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return build_model(MLP)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("layers") / "in.pt"
    path.write_bytes(save_model(ModelArtifact("torch", build_model(MLP), {})))
    return path


def sparsity(w: torch.Tensor) -> float:
    return float((w == 0).float().mean())


# --- prune_structured ---------------------------------------------------------------------------


def test_structured_per_layer_amounts_and_skip(mlp):
    pruned = prune_structured.prune_structured(
        mlp, amount=0.5, in_features=64, layers={"0": {"amount": 0.25}, "2": "skip"}
    )
    assert _widths(pruned) == {"0": 48, "2": 32, "4": 10}
    # Global 0 with one layer's own amount: only that layer shrinks.
    only = prune_structured.prune_structured(
        mlp, amount=0.0, in_features=64, layers={"2": {"amount": 0.75}}
    )
    assert _widths(only) == {"0": 64, "2": 8, "4": 10}
    assert only(torch.rand(2, 64)).shape == (2, 10)


def test_structured_skip_on_a_cnn_layer_keeps_its_channels():
    torch.manual_seed(0)
    model = build_model(CNN)
    pruned = prune_structured.prune_structured(
        model, amount=0.5, in_features=64, layers={"1": "skip"}
    )
    assert _widths(pruned)["1"] == 8 and _widths(pruned)["5"] == 8


def test_structured_refuses_an_amount_on_the_classifier_named_exactly(mlp):
    with pytest.raises(BadInputError, match=r"layer '4' emits the logits"):
        prune_structured.prune_structured(
            mlp, amount=0.5, in_features=64, layers={"4": {"amount": 0.5}}
        )
    # A wildcard that also matches the classifier leaves it alone.
    pruned = prune_structured.prune_structured(
        mlp, amount=0.0, in_features=64, layers={"*": {"amount": 0.5}}
    )
    assert _widths(pruned) == {"0": 32, "2": 16, "4": 10}


def test_unstructured_per_layer_amounts_layer_and_global_scope(mlp):
    amounts = unstructured_layer_amounts(mlp, {"0": {"amount": 0.9}, "4": "skip"})
    assert amounts == {"0.weight": 0.9, "4.weight": 0.0}
    for scope in ("layer", "global"):
        pruned, _ = prune_unstructured(mlp, amount=0.5, scope=scope, layer_amounts=amounts)
        assert sparsity(pruned[0].weight) == pytest.approx(0.9, abs=0.01)
        assert sparsity(pruned[4].weight) == 0.0
        if scope == "layer":
            assert sparsity(pruned[2].weight) == pytest.approx(0.5, abs=0.01)


def test_gradual_reaches_each_layers_own_final_sparsity(mlp):
    data = load_dataset("digits")
    amounts = unstructured_layer_amounts(mlp, {"2": {"amount": 0.8}, "4": "skip"})
    pruned, report = prune_gradual(
        mlp,
        data,
        final=0.5,
        frequency=5,
        prune_epochs=1,
        finetune_epochs=0,
        layer_amounts=amounts,
    )
    assert report["n_events"] >= 1
    assert sparsity(pruned[0].weight) == pytest.approx(0.5, abs=0.01)
    assert sparsity(pruned[2].weight) == pytest.approx(0.8, abs=0.01)
    assert sparsity(pruned[4].weight) == 0.0


def test_prune_params_refuse_a_bad_layer_amount_by_name():
    with pytest.raises(ValidationError, match=r"layers\['fc_out'\]\.amount must be .*\[0, 1\)"):
        PruneParams(layers={"fc_out": {"amount": 1.0}})
    assert PruneParams(layers={"0": {"amount": 0}}).layers == {"0": {"amount": 0.0}}


def test_prune_step_records_the_resolved_settings(model_file):
    record = run_single_step(
        "prune_structured",
        {"amount": 0.5, "finetune_epochs": 0, "layers": {"0": {"amount": 0.25}, "2": "skip"}},
        input_path=model_file,
        output_path=None,
    )
    metrics = record.metrics
    assert metrics["widths"] == {"0": [64, 48]}
    assert metrics["layer_settings"]["2"] == {"setting": "skip", "pattern": "2"}


# --- lowrank ------------------------------------------------------------------------------------


def test_lowrank_rank_above_full_rank_is_refused_naming_the_layer(mlp):
    with pytest.raises(BadInputError, match=r"rank 40 for layer '2' .* full rank 32"):
        lowrank_factorize(mlp, layers={"2": {"rank": 40}})


def test_lowrank_conv_layers_need_conv_and_the_error_says_so():
    model = build_model(CNN)
    with pytest.raises(BadInputError, match=r"'1' matches no layer; .*: 11 \(Conv2d layers"):
        lowrank_factorize(model, layers={"1": {"rank": 2}})
    out, report = lowrank_factorize(model, conv=True, layers={"1": {"rank": 2}, "*": "skip"})
    replaced = [r["layer"] for r in report if r["replaced"]]
    assert replaced == ["1"] and out[1][0].out_channels == 2


def test_lowrank_params_check_the_setting():
    with pytest.raises(ValidationError, match=r"layers\['0'\]\.energy must be .*\(0, 1\]"):
        LowRankParams(layers={"0": {"energy": 1.5}})
    with pytest.raises(ValidationError, match="give exactly one of rank, energy, ratio"):
        LowRankParams(layers={"0": {"rank": 2, "ratio": 0.5}})


# --- quantize_dynamic ---------------------------------------------------------------------------


def test_quantize_per_layer_dtype_and_skip(mlp):
    out, replaced = quantize_dynamic.quantize_dynamic(
        mlp, layers={"0": {"dtype": "float16"}, "4": "skip"}
    )
    assert replaced == ["0", "2"]
    assert (type(out[0]), type(out[2]), type(out[4])) == (Float16Linear, Int8Linear, nn.Linear)
    with pytest.raises(BadInputError, match=r"skips every Linear layer \(0, 2, 4\)"):
        quantize_dynamic.quantize_dynamic(mlp, layers={"*": "skip"})
    with pytest.raises(ValidationError, match=r"layers\['0'\]\.dtype must be one of"):
        QuantizeParams(layers={"0": {"dtype": "int4"}})


def test_quantize_step_reports_each_layers_dtype(model_file, tmp_path):
    record = run_single_step(
        "quantize_dynamic",
        {"layers": {"4": "skip", "0": {"dtype": "float16"}}},
        input_path=model_file,
        output_path=tmp_path / "q.pt",
    )
    metrics = record.metrics
    assert metrics["layer_dtypes"] == {"0": "float16", "2": "int8", "4": "float32"}
    assert metrics["skipped_layers"] == ["4"] and metrics["quantized_layers"] == ["0", "2"]


# --- the scripts: bad input exits 2, names the layer, writes nothing ------------------------------


@pytest.mark.parametrize(
    ("script", "args", "needles"),
    [
        (
            prune_structured,
            ["--amount", "0.5", "--layers", json.dumps({"head.*": {"amount": 0.2}})],
            ["'head.*' matches no layer", "0, 2, 4"],
        ),
        (
            prune_structured,
            ["--amount", "0.5", "--layers", json.dumps({"2": {"amount": 1.5}})],
            ["layers['2'].amount", "[0, 1)"],
        ),
        (lowrank, ["--layers", json.dumps({"0": {"rank": 65}})], ["layer '0'", "full rank 64"]),
        (quantize_dynamic, ["--layers", json.dumps({"fc": "skip"})], ["'fc' matches no layer"]),
    ],
)
def test_scripts_refuse_bad_layers_with_exit_2(script, args, needles, model_file, tmp_path, capsys):
    out = tmp_path / "out.pt"
    io = [str(model_file), str(out)] if script is quantize_dynamic else []
    if not io:
        io = ["--input-model", str(model_file), "--output-model", str(out)]
    assert script.main([*io, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    for needle in needles:
        assert needle in err
    assert not out.exists()
