"""The torch technique scripts as users run them: `python -m modules.compression.<name>`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modules.compression import distill, lowrank, measure_inference_time, prune_structured
from modules.compression import quantize_dynamic as quantize_script
from modules.compression.quantize_dynamic import quantize_dynamic
from modules.core.artifact import ModelArtifact
from modules.storage.architectures import build_model
from modules.storage.datasets import load_dataset
from modules.storage.model_formats import save_model

ROOT = Path(__file__).resolve().parents[3]
# Six scripts run at once on a small machine: one thread each avoids oversubscription.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    from modules.training.train import TrainParams, train_baseline

    params = TrainParams(model="mlp", arch={"name": "mlp", "hidden": [64]}, epochs=5)
    artifact, _ = train_baseline(params, load_dataset("digits"), seed=0)
    path = tmp_path_factory.mktemp("cli") / "in.pt"
    path.write_bytes(save_model(artifact))
    return path


def cli(module: str, *args: object) -> list[str]:
    return [sys.executable, "-m", f"modules.compression.{module}", *map(str, args)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, model_file):
    """Every script run as its own process, all started at once (they are mostly imports)."""
    d = tmp_path_factory.mktemp("runs")
    student = d / "student.pt"
    small = build_model({"name": "mlp", "in_features": 64, "hidden": [16], "num_classes": 10})
    student.write_bytes(save_model(ModelArtifact("torch", small, {})))
    commands = {
        "prune": cli(
            "prune_structured",
            "--input-model", model_file, "--output-model", d / "pruned.pt", "--amount", 0.5,
            "--method", "structured", "--dataset", "digits", "--finetune-epochs", 1,
        ),
        "distill": cli(
            "distill",
            "--teacher", model_file, "--student", student, "--output", d / "distilled.pt",
            "--temperature", 4, "--alpha", 0.7, "--epochs", 2,
        ),
        "quantize": cli("quantize_dynamic", model_file, d / "q.pt"),
        "lowrank": cli(
            "lowrank", "--input-model", model_file, "--output-model", d / "lr.pt",
            "--energy", 0.9, "--finetune-epochs", 1,
        ),
        "measure": cli(
            "measure_inference_time", "--input-model", model_file, "--batch-sizes", "1,8",
            "--runs", 3, "--warmup", 1,
        ),
        "bad_amount": cli(
            "prune_structured", "--input-model", model_file, "--output-model", d / "bad.pt",
            "--amount", 1.5,
        ),
    }  # fmt: skip
    procs = {
        name: subprocess.Popen(
            cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, cmd in commands.items()
    }
    done = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        done[name] = subprocess.CompletedProcess(commands[name], proc.returncode, stdout, stderr)
    return d, done


def last_json(stdout: str) -> dict:
    lines = stdout.strip().splitlines()
    assert lines, "no output"
    return json.loads(lines[-1])


def assert_weights_only_model(path: Path) -> dict:
    checkpoint = torch.load(path, weights_only=True)
    assert {"arch", "state_dict", "meta"} <= checkpoint.keys()
    return checkpoint


def test_prune_cli_round_trip(runs):
    d, done = runs
    assert done["prune"].returncode == 0, done["prune"].stderr
    line = last_json(done["prune"].stdout)
    out = d / "pruned.pt"
    assert line["step"] == "prune_structured" and line["output_model"] == str(out)
    assert line["output_size"] == out.stat().st_size < line["input_size"]
    assert line["metrics"]["widths"] == {"0": [64, 32]}
    assert_weights_only_model(out)


def test_distill_cli_round_trip_with_student_file(runs):
    d, done = runs
    assert done["distill"].returncode == 0, done["distill"].stderr
    metrics = last_json(done["distill"].stdout)["metrics"]
    out = d / "distilled.pt"
    assert metrics["student"]["size_bytes"] == out.stat().st_size
    assert metrics["teacher"]["params"] > metrics["student"]["params"]
    assert assert_weights_only_model(out)["state_dict"]["0.weight"].shape == (16, 64)


def test_quantize_cli_round_trip(runs, model_file):
    d, done = runs
    assert done["quantize"].returncode == 0, done["quantize"].stderr
    line = last_json(done["quantize"].stdout)
    out = d / "q.pt"
    assert line["metrics"]["dtype"] == "int8"
    assert out.stat().st_size < model_file.stat().st_size / 2
    assert assert_weights_only_model(out)["state_dict"]["0.weight"].dtype == torch.int8


def test_lowrank_cli_round_trip(runs):
    d, done = runs
    assert done["lowrank"].returncode == 0, done["lowrank"].stderr
    metrics = last_json(done["lowrank"].stdout)["metrics"]
    assert metrics["rank_rule"] == "energy" and metrics["layers"]
    assert_weights_only_model(d / "lr.pt")


def test_measure_cli_prints_latency_with_ci(runs):
    _, done = runs
    assert done["measure"].returncode == 0, done["measure"].stderr
    metrics = last_json(done["measure"].stdout)["metrics"]
    assert set(metrics["latency_ms"]) == {"b1", "b8"}
    assert metrics["latency_ms"]["b8"]["n"] >= 3 and len(metrics["latency_ms"]["b8"]["ci95"]) == 2


def test_bad_amount_exits_2_and_writes_nothing(runs):
    d, done = runs
    bad = done["bad_amount"]
    assert bad.returncode == 2
    assert bad.stderr.startswith("error:") and "amount=1.5" in bad.stderr
    assert not (d / "bad.pt").exists() and bad.stdout == ""


def refused(main, argv, capsys, out: Path) -> str:
    assert main([str(a) for a in argv]) == 2
    assert not out.exists()
    err = capsys.readouterr().err
    assert err.startswith("error:")
    return err


def test_bad_inputs_in_process_exit_2_naming_the_problem(tmp_path, model_file, capsys):
    out = tmp_path / "out.pt"
    prune = prune_structured.main
    io_args = ["--input-model", model_file, "--output-model", out]
    err = refused(prune, [*io_args, "--amount", 0.5, "--method", "magic"], capsys, out)
    assert "method='magic'" in err
    err = refused(prune, [*io_args, "--amount", -0.1], capsys, out)
    assert "amount=-0.1" in err

    quantized, _ = quantize_dynamic(build_model({"name": "mlp", "in_features": 64, "hidden": [8],
                                                 "num_classes": 10}))  # fmt: skip
    qfile = tmp_path / "q.pt"
    qfile.write_bytes(save_model(ModelArtifact("torch", quantized, {})))
    err = refused(prune, ["--input-model", qfile, "--output-model", out, "--amount", 0.5],
                  capsys, out)  # fmt: skip
    assert "layer 0 is a Int8Linear" in err or "layer 0 (Int8Linear)" in err

    kd = ["--teacher", model_file, "--output", out]
    err = refused(distill.main, [*kd, "--student-arch", '{"name": "mlp", "num_classes": 3}'],
                  capsys, out)  # fmt: skip
    assert "num_classes=3" in err and "teacher has num_classes=10" in err
    wide = tmp_path / "wide.pt"
    student = build_model({"name": "mlp", "in_features": 32, "hidden": [8], "num_classes": 10})
    wide.write_bytes(save_model(ModelArtifact("torch", student, {})))
    err = refused(distill.main, [*kd, "--student", wide], capsys, out)
    assert "student takes 32 input features but the teacher takes 64" in err
    err = refused(distill.main, [*kd, "--student-arch", "{not json"], capsys, out)
    assert "--student-arch is not valid JSON" in err

    err = refused(lowrank.main, [*io_args, "--energy", 1.5], capsys, out)
    assert "energy=1.5" in err
    err = refused(quantize_script.main, [model_file, out, "--dtype", "int4"], capsys, out)
    assert "dtype='int4'" in err
    err = refused(measure_inference_time.main, ["--input-model", model_file, "--batch-sizes",
                                                "1,x"], capsys, out)  # fmt: skip
    assert "--batch-sizes" in err
