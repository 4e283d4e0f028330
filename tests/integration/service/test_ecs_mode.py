"""ECS env-var mode as a subprocess with only env vars, and the EcsDispatcher against moto's ECS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import boto3
import pytest

from modules.core.jobspec import parse_job_spec
from modules.core.records import JobRecord
from modules.core.registry import list_steps
from modules.pipeline.settings import build_services, create_dev_resources, load_settings
from tests.devstack import ROOT
from workers.dispatch import EcsDispatcher

pytestmark = pytest.mark.integration

ENTRY_TIMEOUT_S = 180


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def aws(moto_endpoint: str, tmp_path: Path) -> dict[str, Any]:
    """A bucket holding Alice's model, unique table names, and the env every ECS task shares."""
    bucket, steps_table = _name("ecs-models"), _name("ecs-steps")
    s3 = boto3.client("s3", region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    base_env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "PYTHONPATH": str(ROOT),
        "AWS_ENDPOINT_URL": moto_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "MCAAS_STEP_LOG": "dynamodb+csv",
        "MCAAS_STEPS_TABLE": steps_table,
        "MCAAS_CSV_LOG": str(tmp_path / "steps.csv"),
        "MCAAS_DEV_MODE": "true",
        "TORCH_FORCE_WEIGHTS_ONLY_LOAD": "1",
    }
    return {"s3": s3, "bucket": bucket, "steps_table": steps_table, "env": base_env}


@pytest.fixture
def alice_model(aws: dict[str, Any], torch_model_bytes: bytes) -> str:
    key = "users/alice/models/m1/model.pt"
    aws["s3"].put_object(Bucket=aws["bucket"], Key=key, Body=torch_model_bytes)
    return key


def run_entry(module: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`python -m <module>` with exactly `env` and no arguments: how ECS starts the container."""
    return subprocess.run(
        [sys.executable, "-m", module],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=ENTRY_TIMEOUT_S,
    )


def model_step() -> str:
    """A quick step that writes a model, if one is registered; else measure."""
    names = {step.name for step in list_steps()}
    return "quantize_dynamic" if "quantize_dynamic" in names else "measure"


def keys_under(aws: dict[str, Any], prefix: str) -> list[str]:
    listed = aws["s3"].list_objects_v2(Bucket=aws["bucket"], Prefix=prefix)
    return sorted(item["Key"] for item in listed.get("Contents", []))


def step_items(aws: dict[str, Any], job_id: str) -> list[dict[str, Any]]:
    dynamodb = boto3.client("dynamodb", region_name="us-east-1")
    items: list[dict[str, Any]] = dynamodb.query(
        TableName=aws["steps_table"],
        KeyConditionExpression="job_id = :j",
        ExpressionAttributeValues={":j": {"S": job_id}},
    )["Items"]
    return items


def contract(aws: dict[str, Any], model_key: str, job_id: str, step: str) -> dict[str, str]:
    return {
        "MODEL_BUCKET": aws["bucket"],
        "MODEL_S3_KEY": model_key,
        "USER_ID": "alice",
        "PROFILE": "edge-8mb",
        "JOB_ID": job_id,
        "STEP": step,
        "STEP_PARAMS": "{}",
    }


def csv_job_rows(aws: dict[str, Any], job_id: str) -> list[dict[str, str]]:
    import csv

    path = Path(aws["env"]["MCAAS_CSV_LOG"])
    with open(path, newline="", encoding="utf-8") as handle:
        return [row for row in csv.DictReader(handle) if row["job_id"] == job_id]


def assert_step_stored(aws: dict[str, Any], *, job_id: str, step: str, model_key: str) -> None:
    """One DynamoDB item and one CSV row for the job, and the output model under its prefix."""
    prefix = f"users/alice/edge-8mb/{job_id}/00-{step}/"
    if step != "measure":
        assert keys_under(aws, prefix) == [f"{prefix}model.pt"]
    (item,) = step_items(aws, job_id)
    assert item["profile"] == {"S": "edge-8mb"} and item["user_id"] == {"S": "alice"}
    assert item["step_name"] == {"S": step} and int(item["output_size"]["N"]) > 0
    record = json.loads(item["record_json"]["S"])
    assert record["input_key"] == model_key and record["dataset"]["fingerprint"]
    assert [row["step"] for row in csv_job_rows(aws, job_id)] == [step]


def test_ecs_entry_runs_a_step_from_env_vars_only(aws, alice_model) -> None:
    step = model_step()
    job_id = _name("ecs-job")
    env = {**aws["env"], **contract(aws, alice_model, job_id, step)}
    result = run_entry("workers.ecs_entry", env)
    assert result.returncode == 0, result.stderr
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert line["job_id"] == job_id and line["step"] == step
    assert_step_stored(aws, job_id=job_id, step=step, model_key=alice_model)
    keys = keys_under(aws, "users/alice/")
    # ECS retries a task by running it again: still one record and the same keys.
    again = run_entry("workers.ecs_entry", env)
    assert again.returncode == 0, again.stderr
    assert_step_stored(aws, job_id=job_id, step=step, model_key=alice_model)
    assert keys_under(aws, "users/alice/") == keys


def test_a_technique_script_runs_with_no_arguments(aws, alice_model) -> None:
    step = model_step()
    module = "measure_inference_time" if step == "measure" else step
    job_id = _name("ecs-job")
    env = {**aws["env"], **contract(aws, alice_model, job_id, step)}
    result = run_entry(f"modules.compression.{module}", env)
    assert result.returncode == 0, result.stderr
    assert_step_stored(aws, job_id=job_id, step=step, model_key=alice_model)


def test_ecs_entry_runs_compress_from_env_vars(aws, alice_model) -> None:
    """STEP=compress: the search runs as the container's one step; its ONNX winner is stored."""
    job_id = _name("ecs-compress")
    env = {**aws["env"], **contract(aws, alice_model, job_id, "compress")}
    env["STEP_PARAMS"] = json.dumps({"max_drop": 50, "max_time_s": 1})
    result = run_entry("workers.ecs_entry", env)
    assert result.returncode == 0, result.stderr
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert line["step"] == "compress" and line["verdict"]["passed"], line["verdict"]
    prefix = f"users/alice/edge-8mb/{job_id}/00-compress/"
    keys = keys_under(aws, prefix)
    for name in ("model.onnx", "native_model.pt", "compress.json", "report.html"):
        assert f"{prefix}{name}" in keys
    (item,) = step_items(aws, job_id)
    assert item["step_name"] == {"S": "compress"}


def test_env_var_mode_refuses_a_foreign_model_key(aws, torch_model_bytes) -> None:
    foreign = "users/bob/models/m1/model.pt"
    aws["s3"].put_object(Bucket=aws["bucket"], Key=foreign, Body=torch_model_bytes)
    job_id = _name("ecs-job")
    result = run_entry(
        "workers.ecs_entry", {**aws["env"], **contract(aws, foreign, job_id, "measure")}
    )
    assert result.returncode == 2
    assert "refusing to start" in result.stderr and "users/alice/" in result.stderr
    assert "Traceback" not in result.stderr
    assert keys_under(aws, "users/alice/") == []


@pytest.fixture
def ecs_cluster(moto_endpoint: str) -> dict[str, str]:
    """A cluster, a Fargate task definition and a VPC network in moto."""
    ec2 = boto3.client("ec2", region_name="us-east-1")
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    # moto's RunTask names the task's ENI by DNS; it needs DNS hostnames on the VPC.
    ec2.modify_vpc_attribute(VpcId=vpc, EnableDnsHostnames={"Value": True})
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.1.0/24")["Subnet"]["SubnetId"]
    group = ec2.create_security_group(GroupName=_name("sg"), Description="mcaas", VpcId=vpc)
    ecs = boto3.client("ecs", region_name="us-east-1")
    cluster = _name("mcaas")
    ecs.create_cluster(clusterName=cluster)
    family = _name("mcaas-worker")
    ecs.register_task_definition(
        family=family,
        requiresCompatibilities=["FARGATE"],
        networkMode="awsvpc",
        cpu="1024",
        memory="2048",
        containerDefinitions=[
            {
                "name": "worker",
                "image": "mcaas:latest",
                "cpu": 1024,
                "memory": 2048,
                "essential": True,
                "command": ["python", "-m", "workers.ecs_entry"],
            }
        ],
    )
    return {
        "MCAAS_ECS_CLUSTER": cluster,
        "MCAAS_ECS_TASK_DEFINITION": family,
        "MCAAS_ECS_SUBNETS": subnet,
        "MCAAS_ECS_SECURITY_GROUPS": group["GroupId"],
    }


def _task_env(ecs: Any, cluster: str, arn: str) -> dict[str, str]:
    (task,) = ecs.describe_tasks(cluster=cluster, tasks=[arn])["tasks"]
    (override,) = task["overrides"]["containerOverrides"]
    assert override["name"] == "worker"
    return {pair["name"]: pair["value"] for pair in override["environment"]}


def test_ecs_dispatcher_runs_a_job_as_ecs_tasks(aws, alice_model, ecs_cluster) -> None:
    """RunTask overrides carry the contract; running each task's env completes the job."""
    env = {
        **aws["env"],
        **ecs_cluster,
        "MCAAS_DISPATCHER": "ecs",
        "MODEL_BUCKET": aws["bucket"],
        "MCAAS_JOBS_TABLE": _name("ecs-jobs"),
    }
    settings = load_settings(
        dispatcher="ecs",
        model_bucket=aws["bucket"],
        jobs_table=env["MCAAS_JOBS_TABLE"],
        steps_table=aws["steps_table"],
        step_log="dynamodb+csv",
        csv_log=env["MCAAS_CSV_LOG"],
        ecs_cluster=ecs_cluster["MCAAS_ECS_CLUSTER"],
        ecs_task_definition=ecs_cluster["MCAAS_ECS_TASK_DEFINITION"],
        ecs_subnets=ecs_cluster["MCAAS_ECS_SUBNETS"],
        ecs_security_groups=ecs_cluster["MCAAS_ECS_SECURITY_GROUPS"],
    )
    services = build_services(settings)
    create_dev_resources(services)
    step = model_step()
    spec = parse_job_spec(
        {
            "user_id": "alice",
            "model": alice_model,
            "steps": [{"name": step}, {"name": "measure", "params": {"runs": 3}}],
        }
    )
    services.jobs.create(JobRecord.new(spec))
    EcsDispatcher(settings, services).submit(spec.job_id)

    ecs = boto3.client("ecs", region_name="us-east-1")
    cluster = ecs_cluster["MCAAS_ECS_CLUSTER"]
    (first_arn,) = services.jobs.get(spec.job_id).ecs_tasks
    assert _task_env(ecs, cluster, first_arn) == {
        "MODEL_BUCKET": aws["bucket"],
        "MODEL_S3_KEY": alice_model,
        "USER_ID": "alice",
        "PROFILE": "edge-8mb",
        "JOB_ID": spec.job_id,
        "STEP": step,
        "STEP_PARAMS": "{}",
        "STEP_INDEX": "0",
        "DATASET": "digits",
    }
    # Play ECS: start each task's container (the entrypoint) with its env overrides.
    done: set[str] = set()
    for _ in range(len(spec.steps) + 1):
        pending = [a for a in services.jobs.get(spec.job_id).ecs_tasks if a not in done]
        if not pending:
            break
        for arn in pending:
            result = run_entry("workers.ecs_entry", {**env, **_task_env(ecs, cluster, arn)})
            assert result.returncode == 0, result.stderr
            done.add(arn)
    job = services.jobs.get(spec.job_id)
    assert job.status == "COMPLETED", job.reason
    assert len(job.ecs_tasks) == 2
    second = _task_env(ecs, cluster, job.ecs_tasks[1])
    records = services.log.records(spec.job_id)
    assert second["MODEL_S3_KEY"] == records[0].output_key
    assert (second["STEP"], second["STEP_INDEX"]) == ("measure", "1")
    assert [r.step for r in records] == [step, "measure"]
    assert len(step_items(aws, spec.job_id)) == 2
