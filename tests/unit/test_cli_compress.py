"""`mcaas compress`: a small MLP on digits to a profile, end to end, and its failure modes."""

import json

import onnx
import pytest
from typer.testing import CliRunner

from modules.cli import app
from modules.core import profiles
from modules.core.profiles import Profile
from modules.storage.model_formats import load_model_file, save_model

runner = CliRunner()
FAST = json.dumps(
    {
        "finetune_epochs": 2,
        "distill_epochs": 4,
        "proxy_distill_epochs": 2,
        "finalists": 2,
        "runs": 3,
        "warmup": 1,
    }
)


@pytest.fixture
def model_file(small_mlp, tmp_path):
    path = tmp_path / "mlp.pt"
    path.write_bytes(save_model(small_mlp))
    return path


def compress(model_file, out, *extra):
    args = ["compress", str(model_file), "--output", str(out), "--params", FAST, *extra]
    return runner.invoke(app, args)


def test_compress_writes_a_gated_onnx_and_its_reports(model_file, tmp_path):
    out = tmp_path / "out"
    res = compress(model_file, out, "--profile", "edge-8mb", "--max-drop", "5")
    assert res.exit_code == 0, res.output
    assert "goal met" in res.output
    # The bar follows the search candidate by candidate: each gated candidate's line shows.
    gate_lines = [line for line in res.output.splitlines() if "ONNX gate " in line]
    assert len(gate_lines) >= 2, res.output
    assert "proxy 1/" in res.output
    assert sorted(p.name for p in out.iterdir()) == [
        "compress.json",
        "deployment_report.json",
        "model.onnx",
        "model.pt",
        "report.html",
    ]
    onnx.checker.check_model(str(out / "model.onnx"))
    summary = json.loads((out / "compress.json").read_text())
    assert summary["met_goal"] and summary["profile"] == "edge-8mb"
    assert summary["winner"]["parity"]["passed"]
    assert (out / "model.onnx").stat().st_size == summary["winner"]["size_bytes"]
    assert load_model_file(out / "model.pt").framework == "torch"
    assert json.loads((out / "deployment_report.json").read_text())["passed"] is True


def test_a_budget_nobody_meets_is_rejected_with_best_so_far(model_file, tmp_path, monkeypatch):
    tiny = Profile(name="tiny", memory_budget_mb=1e-6, compute_scale=1, power_w=1)
    monkeypatch.setitem(profiles.BUILTIN_PROFILES, "tiny", tiny)
    out = tmp_path / "out"
    res = compress(model_file, out, "--profile", "tiny")
    assert res.exit_code == 1, res.output
    assert "REJECTED: no candidate met the goal on profile tiny" in res.output
    names = {p.name for p in out.iterdir()}
    # The numbers and the best-so-far come back; model.onnx is only ever a winner.
    assert "model.onnx" not in names
    assert {"best_so_far.onnx", "compress.json", "report.html"} <= names
    assert json.loads((out / "compress.json").read_text())["outcome"] == "rejected"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--profile", "nope"), "unknown profile 'nope'"),
        (("--max-drop", "-1"), "max_drop"),
        (("--objective", "speed"), "objective"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(model_file, tmp_path, args, needle):
    out = tmp_path / "out"
    res = compress(model_file, out, *args)
    assert res.exit_code == 2, res.output
    assert needle in res.output
    assert not out.exists()
