"""ECS env-var mode: the contract's checks, and the script hook that enters it."""

from __future__ import annotations

import sys

import pytest

from modules.errors import BadInputError
from modules.pipeline.ecs import ecs_main, read_ecs_env
from modules.pipeline.script import script_main

ENV = {
    "MODEL_BUCKET": "models",
    "MODEL_S3_KEY": "users/alice/models/m1/model.pt",
    "USER_ID": "alice",
    "PROFILE": "edge-8mb",
    "JOB_ID": "job-7",
    "STEP": "quantize_dynamic",
    "STEP_PARAMS": '{"dtype": "int8"}',
}


def test_reads_the_contract() -> None:
    task = read_ecs_env(ENV)
    assert task.bucket == "models" and task.model_key == ENV["MODEL_S3_KEY"]
    assert (task.user_id, task.profile, task.job_id) == ("alice", "edge-8mb", "job-7")
    assert task.step == "quantize_dynamic" and task.params == {"dtype": "int8"}
    assert task.dataset == "digits"
    assert read_ecs_env({**ENV, "DATASET": "iris", "STEP_PARAMS": ""}).params == {}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"MODEL_BUCKET": ""}, "MODEL_BUCKET"),
        ({"STEP": "", "JOB_ID": ""}, "JOB_ID, STEP"),
        ({"MODEL_S3_KEY": "users/bob/models/m1/model.pt"}, "not a valid key under users/alice/"),
        ({"MODEL_S3_KEY": "users/alice/../bob/model.pt"}, "refusing to start"),
        ({"MODEL_S3_KEY": "models/m1/model.pt"}, "refusing to start"),
        ({"USER_ID": "../alice"}, "USER_ID"),
        ({"STEP_PARAMS": "{not json"}, "STEP_PARAMS is not valid JSON"),
        ({"STEP_PARAMS": "[1, 2]"}, "must be a JSON object"),
    ],
)
def test_refuses_a_bad_environment(change: dict[str, str], message: str) -> None:
    with pytest.raises(BadInputError, match=message):
        read_ecs_env({**ENV, **change})


def test_a_script_refuses_another_steps_env() -> None:
    with pytest.raises(BadInputError, match="runs the 'prune_structured' step"):
        read_ecs_env(ENV, step="prune_structured")
    assert read_ecs_env({**ENV, "STEP": ""}, step="measure").step == "measure"


def test_a_job_step_may_have_no_input_model() -> None:
    task = read_ecs_env({**ENV, "MODEL_S3_KEY": ""}, model_required=False)
    assert task.model_key is None
    with pytest.raises(BadInputError, match="MODEL_S3_KEY"):
        read_ecs_env({**ENV, "MODEL_S3_KEY": ""})


def test_ecs_main_exits_2_with_the_reason(capsys: pytest.CaptureFixture[str]) -> None:
    bad = {**ENV, "MODEL_S3_KEY": "users/bob/x.pt"}
    assert ecs_main(None, bad) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: refusing to start")


def test_a_script_with_no_arguments_and_model_s3_key_enters_ecs_mode(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["quantize_dynamic.py"])
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MODEL_S3_KEY", "users/alice/models/m1/model.pt")
    # argparse would exit with a usage error; ECS mode names the missing variables instead.
    assert script_main("quantize_dynamic") == 2
    err = capsys.readouterr().err
    assert "ECS mode needs environment variables: MODEL_BUCKET, USER_ID, PROFILE, JOB_ID" in err


def test_a_script_with_arguments_stays_in_cli_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODEL_S3_KEY", "users/alice/models/m1/model.pt")
    with pytest.raises(SystemExit) as caught:
        script_main("measure", ["--no-such-option"])
    assert caught.value.code == 2
