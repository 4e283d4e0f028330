"""ECS env-var mode: run one step configured only by environment variables (the seed contract).

    MODEL_BUCKET  MODEL_S3_KEY  USER_ID  PROFILE  JOB_ID  STEP  STEP_PARAMS (JSON)  [DATASET]

The model is read from s3://$MODEL_BUCKET/$MODEL_S3_KEY, the step runs through run_step as
step 0 of a one-step job, its outputs go to s3://$MODEL_BUCKET/users/$USER_ID/$PROFILE/
$JOB_ID/00-$STEP/, and its record goes to the step log the settings name (DynamoDB and/or
CSV). Every per-technique script enters here when started with no arguments and
MODEL_S3_KEY set; `python -m workers.ecs_entry` does for any step.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from modules.errors import BadInputError, McaasError
from modules.storage.keys import key_in_user, validate_user_id

if TYPE_CHECKING:
    from modules.core.records import StepRecord

REQUIRED_ENV = ("MODEL_BUCKET", "MODEL_S3_KEY", "USER_ID", "PROFILE", "JOB_ID")


@dataclass(frozen=True)
class EcsTask:
    """One step as the environment describes it."""

    bucket: str
    model_key: str | None
    user_id: str
    profile: str
    job_id: str
    step: str
    params: dict[str, Any]
    dataset: str


def read_ecs_env(
    env: Mapping[str, str], *, step: str | None = None, model_required: bool = True
) -> EcsTask:
    """Parse and check the env-var contract; BadInputError names the variable at fault.

    model_required=False admits an empty MODEL_S3_KEY, for a job step that takes no model.
    """
    required = [n for n in REQUIRED_ENV if model_required or n != "MODEL_S3_KEY"]
    missing = [name for name in required if not env.get(name)]
    env_step = env.get("STEP") or None
    if step is None and env_step is None:
        missing.append("STEP")
    if missing:
        raise BadInputError(f"ECS mode needs environment variables: {', '.join(missing)}")
    if step is not None and env_step is not None and env_step != step:
        raise BadInputError(f"STEP={env_step!r} but this entrypoint runs the {step!r} step")
    user_id = env["USER_ID"]
    try:
        validate_user_id(user_id)
    except BadInputError as exc:
        raise BadInputError(f"USER_ID: {exc}") from None
    model_key = env.get("MODEL_S3_KEY") or None
    if model_key is not None and not key_in_user(model_key, user_id):
        raise BadInputError(
            f"refusing to start: MODEL_S3_KEY {model_key!r} is not a valid key under "
            f"users/{user_id}/"
        )
    raw_params = env.get("STEP_PARAMS") or "{}"
    try:
        params = json.loads(raw_params)
    except json.JSONDecodeError as exc:
        raise BadInputError(f"STEP_PARAMS is not valid JSON: {exc}") from None
    if not isinstance(params, dict):
        raise BadInputError(f"STEP_PARAMS must be a JSON object, got {type(params).__name__}")
    return EcsTask(
        bucket=env["MODEL_BUCKET"],
        model_key=model_key,
        user_id=user_id,
        profile=env["PROFILE"],
        job_id=env["JOB_ID"],
        step=step or str(env_step),
        params=params,
        dataset=env.get("DATASET") or "digits",
    )


def run_ecs_task(task: EcsTask) -> StepRecord:
    """Run the task's step through run_step against S3 and the configured step log."""
    from modules.core.jobspec import parse_job_spec
    from modules.pipeline.run import run_step
    from modules.pipeline.settings import build_step_log, create_step_log_tables, get_settings
    from modules.storage.artifacts import S3Store

    settings = get_settings().require("ecs")
    store = S3Store(task.bucket, region=settings.aws_region)
    log = build_step_log(settings, store=store)
    if settings.dev_mode:
        # Only the step tables: the bucket must already exist, since it holds the model.
        create_step_log_tables(log)
    spec = parse_job_spec(
        {
            "job_id": task.job_id,
            "user_id": task.user_id,
            "model": task.model_key,
            "dataset": task.dataset,
            "profile": task.profile,
            "steps": [{"name": task.step, "params": task.params}],
        }
    )
    existing = log.get(spec.job_id, 0)
    if existing is not None and (
        existing.step != task.step or existing.input_key != task.model_key
    ):
        raise BadInputError(
            f"JOB_ID {task.job_id!r} already has a record for step {existing.step!r} on "
            f"{existing.input_key!r}; give each ECS task its own JOB_ID"
        )
    return run_step(spec, 0, store=store, log=log, trust_pickle=settings.trust_pickle)


def ecs_main(step: str | None = None, env: Mapping[str, str] | None = None) -> int:
    """Run ECS env-var mode; print one JSON line; exit 2 (message on stderr) on our errors."""
    try:
        task = read_ecs_env(os.environ if env is None else env, step=step)
        record = run_ecs_task(task)
    except McaasError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    line = {
        "step": record.step,
        "job_id": record.job_id,
        "output_key": record.output_key,
        "output_size": record.output_size,
        "files": record.files,
        "verdict": record.verdict,
        "metrics": record.metrics,
    }
    print(json.dumps(line, default=str))
    return 0
