"""Every registered step, given a model and a dataset that do not fit together, ends in one
of our errors (a named problem: exit 2 on the CLI, 4xx from the API), never a traceback."""

from __future__ import annotations

import json

import pytest

from modules.core.jobspec import parse_job_spec
from modules.core.registry import list_steps
from modules.errors import McaasError
from modules.pipeline.local import LocalWorkspace
from modules.pipeline.run import run_step

# Steps whose params have no defaults get the smallest call that runs.
REQUIRED_PARAMS = {"sweep": {"step": "measure", "param": "runs", "values": [2]}}
CASES = [(step.name, kind) for step in list_steps() for kind in sorted(step.accepts - {"none"})]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Models fitted to digits (64 features): a torch MLP, a logistic regression, its ONNX."""
    ws = LocalWorkspace(tmp_path_factory.mktemp("mismatch"))
    keys = {}
    for kind, train in (("torch", {"model": "mlp", "epochs": 1}), ("sklearn", {"model": "logreg"})):
        spec = parse_job_spec(
            {"job_id": f"base-{kind}", "steps": [{"name": "train", "params": train}]}
        )
        keys[kind] = run_step(spec, 0, store=ws.store, log=ws.log).output_key
    spec = parse_job_spec(
        {"job_id": "base-onnx", "model": keys["sklearn"], "steps": [{"name": "onnx_export"}]}
    )
    keys["onnx"] = run_step(spec, 0, store=ws.store, log=ws.log).output_key
    return ws, keys


@pytest.mark.parametrize(("step", "kind"), CASES)
def test_a_mismatched_dataset_is_a_named_problem_never_a_traceback(workspace, step, kind):
    ws, keys = workspace
    spec = parse_job_spec(
        {
            "job_id": f"mm-{step}-{kind}",
            "model": keys[kind],
            "dataset": "iris",  # 4 features against the models' 64
            "steps": [{"name": step, "params": REQUIRED_PARAMS.get(step, {})}],
        }
    )
    try:
        run_step(spec, 0, store=ws.store, log=ws.log)
    except McaasError as exc:
        assert str(exc)  # it names the problem
    # A step that never reads the data (report, dynamic int8) may complete: that is no crash.


TORCH_STEPS = [step.name for step in list_steps() if "torch" in step.accepts]


@pytest.mark.parametrize("step", TORCH_STEPS)
def test_a_script_given_a_mismatched_dataset_exits_2_naming_it(workspace, step, tmp_path, capsys):
    from modules.pipeline.script import script_main, step_parser

    ws, keys = workspace
    parser, _ = step_parser(step)
    argv = ["--input-model", str(ws.path_of(keys["torch"])), "--dataset", "iris"]
    output = tmp_path / "out.pt"
    if any(a.dest == "output_model" for a in parser._actions):
        argv += ["--output-model", str(output)]
    if step in REQUIRED_PARAMS:
        argv += ["--params", json.dumps(REQUIRED_PARAMS[step])]
    code = script_main(step, argv)
    err = capsys.readouterr().err
    assert code in (0, 2), err
    if code == 2:
        assert err.startswith("error: ") and "Traceback" not in err
        assert len(err.strip()) > len("error: ")  # it names the problem
        assert not output.exists()  # nothing half-written


def test_the_api_refuses_a_dataset_the_model_cannot_take(tmp_path, workspace):
    from fastapi.testclient import TestClient

    from api.main import create_app
    from tests.unit.api.conftest import ALICE, make_settings

    ws, keys = workspace
    with TestClient(create_app(make_settings(tmp_path))) as client:
        upload = client.post(
            "/v1/models",
            headers=ALICE,
            files={"file": ("model.pt", ws.path_of(keys["torch"]).read_bytes())},
        )
        assert upload.status_code == 201, upload.text
        body = {"model_id": upload.json()["id"], "dataset": "iris", "steps": [{"name": "measure"}]}
        answer = client.post("/v1/jobs", headers=ALICE, json=body)
        assert answer.status_code == 422, answer.text
        message = json.dumps(answer.json())
        assert "iris" in message and "4 features" in message and "64" in message
        assert client.get("/v1/jobs", headers=ALICE).json()["data"] == []  # nothing queued
        body["dataset"] = "digits"
        assert client.post("/v1/jobs", headers=ALICE, json=body).status_code == 202
