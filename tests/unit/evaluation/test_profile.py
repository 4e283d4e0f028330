import csv
import io
import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from typer.testing import CliRunner

from modules.cli import app
from modules.compression.quantize_dynamic import quantize_dynamic
from modules.core.artifact import ModelArtifact
from modules.deployment.report import report_figures
from modules.evaluation.measure import count_params
from modules.evaluation.profile import (
    ProfileParams,
    layer_modules,
    layers_csv,
    profile,
    profile_sklearn,
    profile_torch,
    time_layers,
)
from modules.pipeline.local import LocalWorkspace, run_single_step
from modules.storage.architectures import build_model
from modules.storage.model_formats import save_model

FAST = {"warmup": 1, "runs": 3}
MLP = {"name": "mlp", "in_features": 64, "hidden": [32], "num_classes": 10}
CNN = {"name": "cnn", "in_channels": 1, "image_size": 8, "channels": [4, 8], "num_classes": 10}
RESNET = {
    "name": "resnet",
    "in_channels": 1,
    "image_size": 8,
    "widths": [4, 8],
    "blocks": [1, 1],
    "num_classes": 10,
}


def torch_profile(arch_or_model, batch=1):
    model = build_model(arch_or_model) if isinstance(arch_or_model, dict) else arch_or_model
    artifact = ModelArtifact("torch", model.eval(), {})
    x = np.random.default_rng(0).random((batch, 64), dtype=np.float32)
    rows, totals = profile_torch(artifact, x, **FAST)
    return artifact, {r["name"]: r for r in rows}, rows, totals


@pytest.mark.parametrize("batch", [1, 3])
def test_mlp_flops_match_the_hand_count(batch):
    _, by_name, _, totals = torch_profile(MLP, batch)
    # Linear(in, out): in * out multiply-accumulates per row, 2 FLOPs each; ReLU counts 0.
    assert by_name["0"]["flops"] == 2 * 64 * 32 * batch
    assert by_name["1"]["flops"] == 0
    assert by_name["2"]["flops"] == 2 * 32 * 10 * batch
    assert totals["flops"] == totals["flops_in_layers"] == 2 * (64 * 32 + 32 * 10) * batch
    assert by_name["0"]["flops_share"] == pytest.approx(64 * 32 / (64 * 32 + 32 * 10))
    assert by_name["0"]["activation_bytes"] == 32 * 4 * batch
    assert by_name["0"]["output_shape"] == [batch, 32]


def test_cnn_flops_match_the_hand_count():
    _, by_name, _, totals = torch_profile(CNN)
    # Conv2d: out_c x H_out x W_out x (in_c x k x k) MACs; padding 1 keeps 8x8, then pooled to 4x4.
    conv1 = 2 * 4 * 8 * 8 * (1 * 3 * 3)
    conv2 = 2 * 8 * 4 * 4 * (4 * 3 * 3)
    linear = 2 * 8 * 10
    assert (by_name["1"]["flops"], by_name["5"]["flops"], by_name["11"]["flops"]) == (
        conv1,
        conv2,
        linear,
    )
    assert totals["flops"] == conv1 + conv2 + linear
    assert by_name["2"]["flops"] == 0 and by_name["2"]["type"] == "BatchNorm2d"
    assert by_name["1"]["activation_bytes"] == 4 * 8 * 8 * 4


@pytest.mark.parametrize("arch", [MLP, CNN, RESNET], ids=["mlp", "cnn", "resnet"])
def test_per_layer_params_sum_to_the_model_total(arch):
    artifact, by_name, rows, totals = torch_profile(arch)
    total, nonzero = count_params(artifact)
    assert sum(r["params"] for r in rows) == totals["params"] == total
    assert sum(r["nonzero_params"] for r in rows) == nonzero
    assert sum(r["params_share"] for r in rows) == pytest.approx(1.0)
    model = artifact.obj
    assert totals["param_bytes"] == sum(
        t.numel() * t.element_size() for t in model.state_dict().values()
    )
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            assert by_name[name]["params"] == module.weight.numel()


def test_latency_shares_are_fractions_with_a_ci_over_the_runs():
    _, _, rows, totals = torch_profile(RESNET)
    assert all(0 <= r["latency_share"] <= 1 for r in rows)
    assert 0 <= totals["other_share"] <= 1
    for row in rows:
        lo, hi = row["latency_ci95"]
        assert lo <= row["latency_ms"] <= hi and row["latency_stats"]["n"] == FAST["runs"]
    assert totals["forward_ms"]["n"] == FAST["runs"] and "hooks" in totals["latency_note"]
    # Layers inside residual blocks are rows of their own; the blocks are not.
    names = [r["name"] for r in rows]
    assert "4.conv1" in names and "4" not in names and "5.shortcut.0" in names


def test_hook_times_of_the_layers_fit_inside_each_forward():
    model = build_model(RESNET).eval()
    rows = layer_modules(model)
    per_run, forward = time_layers(model, rows, torch.rand(2, 64), warmup=1, runs=4)
    assert len(forward) == 4 and all(len(v) == 4 for v in per_run.values())
    for i, whole in enumerate(forward):
        # Leaves do not nest, so their times in one forward add up to at most that forward.
        assert 0 < sum(per_run[name][i] for name in rows) <= whole


def test_int8_layers_are_counted_by_formula():
    quantized, _ = quantize_dynamic(build_model(MLP))
    artifact, by_name, rows, totals = torch_profile(quantized, batch=2)
    assert by_name["0"]["type"] == "Int8Linear" and by_name["0"]["flops"] == 2 * 2 * 64 * 32
    assert sum(r["params"] for r in rows) == count_params(artifact)[0]
    assert totals["flops"] == 2 * 2 * (64 * 32 + 32 * 10)


def test_knn_rows_are_the_stored_samples_per_class(small_knn, digits):
    rows, totals = profile_sklearn(small_knn)
    assert [r["name"] for r in rows][:10] == [f"class {c}" for c in range(10)]
    samples = [r["stored_samples"] for r in rows if r["type"] == "stored samples"]
    assert samples == np.bincount(digits.y_train).tolist()
    assert totals["stored_samples"] == len(digits.y_train)
    fit_x = small_knn.obj._fit_X
    assert rows[0]["bytes"] >= samples[0] * fit_x.shape[1] * fit_x.itemsize


def test_forest_rows_are_one_per_tree(digits):
    from modules.training.train import TrainParams, train_baseline

    forest, _ = train_baseline(TrainParams(model="rf", n_estimators=3), digits, seed=0)
    rows, totals = profile_sklearn(forest)
    trees = forest.obj.estimators_
    assert len(rows) == len(trees) == 3
    for row, tree in zip(rows, trees, strict=True):
        assert row["nodes"] == tree.tree_.node_count and row["depth"] == tree.get_depth()
        assert row["leaves"] == tree.get_n_leaves() and row["bytes"] > 0
    assert totals["nodes"] == sum(t.tree_.node_count for t in trees)
    assert sum(r["bytes_share"] for r in rows) == pytest.approx(1.0)


def test_step_writes_json_and_csv_and_the_report_draws_it(small_mlp, digits, ctx_factory):
    out = profile(small_mlp, digits, ProfileParams(**FAST), ctx_factory())
    assert out.model is None
    rows = out.metrics["layers"]
    json.dumps(out.metrics)
    table = list(csv.DictReader(io.StringIO(out.files["profile.csv"].decode())))
    assert [r["name"] for r in table] == [r["name"] for r in rows] == ["0", "1", "2"]
    assert int(table[0]["flops"]) == rows[0]["flops"] and ";" in table[0]["latency_ci95"]
    record = {"job_id": "j", "index": 1, "step": "profile", "metrics": out.metrics}
    assert "01_profile_layers" in report_figures([record])
    with pytest.raises(ValidationError, match="runs"):
        ProfileParams(runs=1)


def test_layers_csv_skips_nested_dicts():
    text = layers_csv([{"name": "a", "x": [1, 2], "stats": {"n": 1}}, {"name": "b", "y": 3}])
    assert text.decode().splitlines() == ["name,x,y", "a,1;2,", "b,,3"]


def test_mcaas_profile_prints_the_table_and_refuses_bad_input(tmp_path):
    model = tmp_path / "m.pt"
    model.write_bytes(save_model(ModelArtifact("torch", build_model(MLP), {})))
    runner = CliRunner()
    args = ["profile", "--input-model", str(model), "--dataset", "digits", "--runs", "3"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "ws")])
    assert result.exit_code == 0, result.output
    assert "Linear" in result.stdout and "profile.csv" in result.stdout
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "ws"), "--json"])
    data = json.loads(result.stdout)
    assert [r["name"] for r in data["layers"]] == ["0", "1", "2"]
    missing = ["profile", "--input-model", str(tmp_path / "missing.pt")]
    bad = runner.invoke(app, [*missing, "--out", str(tmp_path / "ws2")])
    assert bad.exit_code == 2 and "missing.pt" in bad.output
    bad = runner.invoke(app, [*args, "--batch-size", "0", "--out", str(tmp_path / "ws2")])
    assert bad.exit_code == 2 and "batch_size" in bad.output


def test_profile_through_run_step_keeps_the_table_in_the_record(tmp_path, small_knn):
    path = tmp_path / "knn.skops"
    path.write_bytes(save_model(small_knn))
    record = run_single_step(
        "profile", {}, input_path=path, output_path=None, workspace=tmp_path / "ws"
    )
    assert record.output_key == record.input_key  # passes the model through
    assert record.metrics["totals"]["framework"] == "sklearn"
    csv_path = LocalWorkspace(tmp_path / "ws").path_of(record.files["profile.csv"])
    assert csv_path.read_text().count("\n") == len(record.metrics["layers"]) + 1
