"""Every registered step, given a model and a dataset that do not fit together, ends in one
of our errors (a named problem: exit 2 on the CLI, 4xx from the API), never a traceback."""

from __future__ import annotations

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
