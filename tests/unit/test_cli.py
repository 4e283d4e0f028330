"""The `mcaas` CLI: real commands, exit code 2 with a named problem, nothing half-written."""

import json
import pickle

import numpy as np
import pytest
from typer.testing import CliRunner

from modules.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, list(args))


def test_steps_and_profiles_list_the_registry():
    out = invoke("steps", "--json")
    assert out.exit_code == 0
    names = {s["name"] for s in json.loads(out.stdout)}
    assert {"train", "measure"} <= names
    out = invoke("profiles", "--json")
    assert {p["name"] for p in json.loads(out.stdout)} >= {"edge-8mb", "mcu-256kb"}


def test_train_writes_a_model_that_loads(tmp_path):
    from modules.storage.model_formats import load_model_file

    out = tmp_path / "knn.skops"
    res = invoke("train", "--model", "knn", "--output", str(out))
    assert res.exit_code == 0, res.output
    assert load_model_file(out).framework == "sklearn"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--model", "svm"], "svm"),
        (["--dataset", "mnist"], "unknown dataset 'mnist'"),
        (["--arch", '{"name": "transformer9"}'], "transformer9"),
        (["--arch", "{not json"], "--arch is not valid JSON"),
        (["--epochs", "0"], "epochs"),
    ],
)
def test_train_bad_input_exits_2_and_writes_nothing(tmp_path, args, needle):
    out = tmp_path / "m.pt"
    res = invoke("train", "--output", str(out), *args)
    assert res.exit_code == 2, res.output
    assert needle in res.output
    assert list(tmp_path.iterdir()) == []


def _job(tmp_path, **spec):
    path = tmp_path / "job.json"
    path.write_text(json.dumps(spec))
    return path


def test_run_job_file_end_to_end(tmp_path):
    job = _job(
        tmp_path,
        job_id="j",
        steps=[
            {"name": "train", "params": {"model": "logreg"}},
            {"name": "measure", "params": {"runs": 3}},
        ],
    )
    res = invoke("run", str(job), "--artifacts", str(tmp_path / "ws"))
    assert res.exit_code == 0, res.output
    # The engine's one report, beside the job's step folders in the workspace store.
    stored = tmp_path / "ws" / "store" / "users" / "local" / "edge-8mb" / "j" / "report.json"
    assert f"report:{stored}" in "".join(res.output.split())  # rich wraps long paths
    report = json.loads(stored.read_text())
    assert report["status"] == "COMPLETED"
    assert [row["step"] for row in report["summary"]] == ["train", "measure"]
    assert report["summary"][1]["latency_b1_ms"] > 0


def test_run_takes_a_local_inputs_file_like_a_local_model(tmp_path):
    from modules.storage.datasets import load_dataset

    rows = load_dataset("digits").X_test[:40]
    np.savez(tmp_path / "rows.npz", input=rows)
    steps = [
        {"name": "train", "params": {"model": "logreg"}},
        {"name": "onnx_export"},
        {"name": "onnx_parity", "params": {"inputs": "rows.npz"}},  # relative to the job file
    ]
    res = invoke(
        "run", str(_job(tmp_path, job_id="npz", steps=steps)), "--artifacts", str(tmp_path / "ws")
    )
    assert res.exit_code == 0, res.output
    stored = tmp_path / "ws" / "store" / "users" / "local" / "edge-8mb" / "npz" / "report.json"
    report = json.loads(stored.read_text())
    assert report["status"] == "COMPLETED", report["reason"]
    parity = report["steps"][2]
    inputs_id = parity["params"]["inputs"]
    assert inputs_id != "rows.npz" and parity["metrics"]["n_samples"] == len(rows)
    assert (tmp_path / "ws" / "store" / "users" / "local" / "inputs").is_dir()

    missing = [*steps[:2], {"name": "onnx_parity", "params": {"inputs": "gone.npz"}}]
    res = invoke(
        "run",
        str(_job(tmp_path, job_id="gone", steps=missing)),
        "--artifacts",
        str(tmp_path / "ws"),
    )
    assert res.exit_code == 2 and "inputs file not found: gone.npz" in res.output


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ({"steps": [{"name": "shrink"}]}, "unknown step 'shrink'"),
        ({"profile": "tiny", "steps": [{"name": "train"}]}, "unknown profile 'tiny'"),
        ({"steps": [{"name": "train", "params": {"epochs": 1.5}}]}, "epochs=1.5"),
    ],
)
def test_run_bad_spec_exits_2_and_writes_nothing(tmp_path, spec, needle):
    res = invoke("run", str(_job(tmp_path, **spec)), "--artifacts", str(tmp_path / "ws"))
    assert res.exit_code == 2
    assert needle in res.output
    assert not (tmp_path / "ws").exists()


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("suffix", [".pt", ".skops", ".onnx", ".pkl"])
def test_pickle_payload_model_is_refused_and_never_runs(tmp_path, suffix):
    marker = tmp_path / "pwned"
    model = tmp_path / f"evil{suffix}"
    model.write_bytes(pickle.dumps(_Payload(marker)))
    job = _job(tmp_path, model=str(model), steps=[{"name": "measure"}])
    res = invoke("run", str(job), "--artifacts", str(tmp_path / "ws"))
    assert res.exit_code == 2, res.output
    assert "error:" in res.output
    assert not marker.exists()


def test_missing_and_corrupt_model_files(tmp_path):
    res = invoke(
        "run", str(_job(tmp_path, model=str(tmp_path / "nope.pt"), steps=[{"name": "measure"}]))
    )
    # A path that is not a file is treated as a store key and is not found.
    assert res.exit_code == 2 and "nope.pt" in res.output
    corrupt = tmp_path / "bad.pt"
    corrupt.write_bytes(b"PK\x03\x04 truncated")
    res = invoke(
        "run",
        str(_job(tmp_path, model=str(corrupt), steps=[{"name": "measure"}])),
        "--artifacts",
        str(tmp_path / "ws"),
    )
    assert res.exit_code == 2 and "bad.pt" in res.output


def test_train_params_json_sets_any_field_and_options_win(tmp_path):
    from modules.storage.model_formats import load_model_file

    out = tmp_path / "knn.skops"
    params = '{"model": "rf", "n_neighbors": 3}'
    res = invoke("train", "--model", "knn", "--params", params, "--output", str(out))
    assert res.exit_code == 0, res.output
    assert load_model_file(out).obj.n_neighbors == 3


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ("[1]", "--params must be a JSON object"),
        ("{nope", "--params is not valid JSON"),
        ('{"n_neighbours": 3}', "n_neighbours"),
    ],
)
def test_train_bad_params_json_exits_2(tmp_path, params, needle):
    out = tmp_path / "m.skops"
    res = invoke("train", "--model", "knn", "--params", params, "--output", str(out))
    assert res.exit_code == 2 and needle in res.output
    assert list(tmp_path.iterdir()) == []


# --- bring your own torch model: --arch for bare state dicts, .pt2 in and out -----------------

SMALL_MLP = {"name": "mlp", "in_features": 64, "hidden": [32], "num_classes": 10}


def _bare_state_dict_file(tmp_path):
    import torch

    from modules.storage.architectures import build_model

    path = tmp_path / "sd.pt"
    torch.save(build_model(SMALL_MLP).state_dict(), path)
    return path


def test_profile_takes_arch_for_a_bare_state_dict(tmp_path):
    sd = _bare_state_dict_file(tmp_path)
    res = invoke(
        "profile", "--input-model", str(sd), "--arch", json.dumps(SMALL_MLP), "--json",
        "--runs", "2", "--warmup", "1", "--out", str(tmp_path / "ws"),
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["totals"]["framework"] == "torch"
    res = invoke("profile", "--input-model", str(sd), "--out", str(tmp_path / "ws2"))
    assert res.exit_code == 2
    assert "bare state_dict" in res.output and "--arch" in res.output
    res = invoke("profile", "--input-model", str(sd), "--arch", "nosuch", "--out", str(tmp_path))
    assert res.exit_code == 2 and "unknown arch 'nosuch'" in res.output


def test_run_rejects_arch_without_a_model_file_before_writing(tmp_path):
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"steps": [{"name": "train"}]}))
    ws = tmp_path / "ws"
    res = invoke("run", str(job), "--artifacts", str(ws), "--arch", "resnet18")
    assert res.exit_code == 2 and "--arch" in res.output
    assert not ws.exists()


def test_scripts_take_arch_and_write_pt2_results(tmp_path):
    from modules.compression.measure_inference_time import main as measure_main
    from modules.compression.quantize_dynamic import main as quantize_main
    from modules.storage.model_formats import load_model_file
    from tests.corpus.make_corpus import pt2_bytes

    sd = _bare_state_dict_file(tmp_path)
    out = tmp_path / "q.pt"
    assert quantize_main([str(sd), str(out), "--arch", json.dumps(SMALL_MLP)]) == 0
    assert load_model_file(out).meta["num_classes"] == 10
    assert quantize_main([str(sd), str(tmp_path / "x.pt")]) == 2
    assert not (tmp_path / "x.pt").exists()

    program = tmp_path / "resmlp.pt2"
    program.write_bytes(pt2_bytes())
    result = tmp_path / "measured.pt2"
    argv = ["--input-model", str(program), "--output-model", str(result), "--runs", "2"]
    assert measure_main(argv) == 0
    loaded = load_model_file(result)
    assert loaded.meta["format"] == "pt2" and loaded.meta["in_features"] == 64
    wrong = tmp_path / "measured.pt"
    argv = ["--input-model", str(program), "--output-model", str(wrong), "--runs", "2"]
    assert measure_main(argv) == 2
    assert not wrong.exists()
