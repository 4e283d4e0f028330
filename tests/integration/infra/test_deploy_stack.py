"""infra/mcaas.yaml deployed into moto's CloudFormation, and the service run against its outputs.

moto has no ElastiCache in CloudFormation and does not evaluate Rules, so the stacks here
either use the ECS dispatcher (no Redis) or pass ExistingRedisUrl; everything else in the
template (bucket, tables, cluster, task definitions, roles, log groups, services) is created.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError

from modules.core.jobspec import parse_job_spec
from modules.core.records import JobRecord
from modules.pipeline.settings import ENV_NAMES, Settings, build_services, load_settings
from modules.storage.artifacts import S3Store
from workers.dispatch import EcsDispatcher

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]
TEMPLATE = ROOT / "infra" / "mcaas.yaml"
STACK_TIMEOUT_S = 60
ENTRY_TIMEOUT_S = 180
USER = "alice"
PROFILE = "edge-8mb"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


@dataclass(frozen=True)
class Stack:
    """A deployed stack: its name and outputs."""

    name: str
    outputs: dict[str, str]

    def settings_env(self) -> dict[str, str]:
        """The outputs whose description names a setting, as {ENV_NAME: value}."""
        return settings_env(self.name)

    def family(self, role: str) -> str:
        return f"{self.name}-{role}"


def settings_env(stack_name: str) -> dict[str, str]:
    cloudformation = boto3.client("cloudformation", region_name="us-east-1")
    (described,) = cloudformation.describe_stacks(StackName=stack_name)["Stacks"]
    env = {}
    for output in described["Outputs"]:
        name, sep, _ = output.get("Description", "").partition(": ")
        if sep and name.isupper():
            env[name] = output["OutputValue"]
    return env


@pytest.fixture(scope="module")
def network(moto_endpoint: str) -> dict[str, str]:
    """A VPC with two subnets in moto's EC2 (the template's VpcId and SubnetIds)."""
    ec2 = boto3.client("ec2", region_name="us-east-1")
    vpc = ec2.create_vpc(CidrBlock="10.20.0.0/16")["Vpc"]["VpcId"]
    # moto's RunTask names the task's ENI by DNS; it needs DNS hostnames on the VPC.
    ec2.modify_vpc_attribute(VpcId=vpc, EnableDnsHostnames={"Value": True})
    subnets = [
        ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.20.{i}.0/24")["Subnet"]["SubnetId"]
        for i in (1, 2)
    ]
    return {"VpcId": vpc, "SubnetIds": ",".join(subnets)}


def deploy(name: str, parameters: dict[str, str]) -> Stack:
    """Create the stack and wait for CREATE_COMPLETE; fail with its events otherwise."""
    cloudformation = boto3.client("cloudformation", region_name="us-east-1")
    cloudformation.create_stack(
        StackName=name,
        TemplateBody=TEMPLATE.read_text(),
        Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in parameters.items()],
        Capabilities=["CAPABILITY_IAM"],
    )
    deadline = time.monotonic() + STACK_TIMEOUT_S
    while True:
        (described,) = cloudformation.describe_stacks(StackName=name)["Stacks"]
        if not described["StackStatus"].endswith("_IN_PROGRESS"):
            break
        assert time.monotonic() < deadline, f"stack {name} still {described['StackStatus']}"
        time.sleep(0.2)
    events = cloudformation.describe_stack_events(StackName=name)["StackEvents"]
    assert described["StackStatus"] == "CREATE_COMPLETE", [
        (e["LogicalResourceId"], e["ResourceStatus"], e.get("ResourceStatusReason")) for e in events
    ]
    outputs = {o["OutputKey"]: o["OutputValue"] for o in described["Outputs"]}
    return Stack(name, outputs)


@pytest.fixture(scope="module")
def stack(network: dict[str, str]) -> Stack:
    """The stack with the ECS dispatcher: no Redis and no worker service."""
    return deploy(unique("mcaas"), {"ImageUri": "mcaas:test", **network, "Dispatcher": "ecs"})


@pytest.fixture(scope="module")
def model_key(stack: Stack) -> str:
    """A logistic regression on digits, uploaded to Alice's models in the stack's bucket."""
    from modules.storage.datasets import load_dataset
    from modules.storage.model_formats import save_model
    from modules.training.train import TrainParams, train_baseline

    artifact, _ = train_baseline(
        TrainParams(model="logreg", max_iter=200), load_dataset("digits"), seed=0
    )
    key = f"users/{USER}/models/m1/model.skops"
    boto3.client("s3", region_name="us-east-1").put_object(
        Bucket=stack.outputs["ModelBucket"], Key=key, Body=save_model(artifact)
    )
    return key


def container(stack: Stack, role: str) -> dict[str, Any]:
    ecs = boto3.client("ecs", region_name="us-east-1")
    task_definition = ecs.describe_task_definition(taskDefinition=stack.family(role))
    (definition,) = task_definition["taskDefinition"]["containerDefinitions"]
    result: dict[str, Any] = definition
    return result


def container_env(stack: Stack, role: str) -> dict[str, str]:
    return {pair["name"]: pair["value"] for pair in container(stack, role)["environment"]}


def run_container(
    moto_endpoint: str, stack: Stack, overrides: dict[str, str], home: Path
) -> subprocess.CompletedProcess[str]:
    """Play ECS: the step-runner's command with its task definition's env plus the overrides."""
    runner = container(stack, "step-runner")
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "PYTHONPATH": str(ROOT),
        # What Fargate gives the task (role credentials) and what points boto3 at moto.
        "AWS_ENDPOINT_URL": moto_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        **{pair["name"]: pair["value"] for pair in runner["environment"]},
        **overrides,
    }
    command = [sys.executable if part == "python" else part for part in runner["command"]]
    return subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=ENTRY_TIMEOUT_S
    )


def bucket_keys(stack: Stack, prefix: str) -> list[str]:
    s3 = boto3.client("s3", region_name="us-east-1")
    pages = s3.get_paginator("list_objects_v2").paginate(
        Bucket=stack.outputs["ModelBucket"], Prefix=prefix
    )
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


def step_items(stack: Stack, job_id: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = boto3.client("dynamodb", region_name="us-east-1").query(
        TableName=stack.outputs["McaasStepsTable"],
        KeyConditionExpression="job_id = :j",
        ExpressionAttributeValues={":j": {"S": job_id}},
        ConsistentRead=True,
    )["Items"]
    return items


def service_families(cluster: str) -> list[str]:
    """The task definition family of each ECS service in the cluster."""
    ecs = boto3.client("ecs", region_name="us-east-1")
    arns = ecs.list_services(cluster=cluster)["serviceArns"]
    # Not launchType: moto's CloudFormation drops a service's LaunchType (it reports EC2).
    described = ecs.describe_services(cluster=cluster, services=arns)["services"] if arns else []
    return sorted(s["taskDefinition"].rsplit("/", 1)[-1].split(":")[0] for s in described)


def test_missing_required_parameters_fail_validation_naming_them(network) -> None:
    cloudformation = boto3.client("cloudformation", region_name="us-east-1")
    name = unique("mcaas-bad")
    cases = [({}, "ImageUri"), ({"ImageUri": "mcaas:test"}, "VpcId")]
    for given, missing in cases:
        with pytest.raises(ClientError) as caught:
            cloudformation.create_stack(
                StackName=name,
                TemplateBody=TEMPLATE.read_text(),
                Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in given.items()],
                Capabilities=["CAPABILITY_IAM"],
            )
        assert caught.value.response["Error"]["Code"] == "ValidationError"
        assert missing in caught.value.response["Error"]["Message"]
    with pytest.raises(ClientError, match="does not exist"):
        cloudformation.describe_stacks(StackName=name)


def test_outputs_configure_the_service_against_the_stacks_resources(stack) -> None:
    env = stack.settings_env()
    assert set(env) <= set(ENV_NAMES.values())
    settings = load_settings(**env)
    # Everything the API and a worker need comes from the outputs (API keys from the table).
    settings.require("api").require("worker").require("ecs")
    services = build_services(settings)
    assert isinstance(services.store, S3Store)
    assert services.store.bucket == stack.outputs["ModelBucket"]

    dynamodb = boto3.client("dynamodb", region_name="us-east-1")
    jobs = dynamodb.describe_table(TableName=settings.jobs_table)["Table"]
    steps = dynamodb.describe_table(TableName=settings.steps_table)["Table"]
    assert jobs["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
    assert [k["AttributeName"] for k in steps["KeySchema"]] == ["job_id", "step"]
    assert [i["IndexName"] for i in jobs["GlobalSecondaryIndexes"]] == ["user_id-created_at"]
    dynamodb.describe_table(TableName=settings.api_keys_table)

    s3 = boto3.client("s3", region_name="us-east-1")
    encryption = s3.get_bucket_encryption(Bucket=settings.model_bucket)
    (rule,) = encryption["ServerSideEncryptionConfiguration"]["Rules"]
    assert rule["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"

    ecs = boto3.client("ecs", region_name="us-east-1")
    (cluster,) = ecs.describe_clusters(clusters=[settings.ecs_cluster])["clusters"]
    assert cluster["status"] == "ACTIVE"
    # Dispatcher=ecs: the API service runs, the Celery worker service is not created.
    assert service_families(settings.ecs_cluster) == [f"{stack.name}-api"]

    logs = boto3.client("logs", region_name="us-east-1")
    groups = logs.describe_log_groups(logGroupNamePrefix=f"/mcaas/{stack.name}/")["logGroups"]
    assert sorted(g["logGroupName"].rsplit("/", 1)[-1] for g in groups) == [
        "api",
        "step-runner",
        "worker",
    ]


def test_task_definitions_carry_each_processs_settings(stack) -> None:
    roles = {"api": "api", "worker": "worker", "step-runner": "ecs"}
    for family_role, settings_role in roles.items():
        definition = container(stack, family_role)
        assert definition["cpu"] > 0 and definition["memory"] > 0, family_role
        assert definition["logConfiguration"]["logDriver"] == "awslogs"
        env = container_env(stack, family_role)
        settings: Settings = load_settings(**env)
        if family_role != "worker":
            # The worker service needs REDIS_URL; this stack runs steps on ECS instead.
            settings.require(settings_role)
        assert settings.model_bucket == stack.outputs["ModelBucket"]
        assert settings.steps_table == stack.outputs["McaasStepsTable"]
        assert settings.step_log == "dynamodb"
    runner = container(stack, "step-runner")
    assert runner["name"] == stack.outputs["McaasEcsContainer"]
    assert runner["command"] == ["python", "-m", "workers.ecs_entry"]
    # Job mode queues the next step with the step-runner's own env: it must be complete.
    load_settings(**container_env(stack, "step-runner")).require("worker")


def test_deployed_step_runner_policy_names_only_this_stacks_data(stack) -> None:
    iam = boto3.client("iam", region_name="us-east-1")
    role_name = stack.outputs["StepRunnerTaskRoleArn"].rsplit("/", 1)[-1]
    assert iam.list_attached_role_policies(RoleName=role_name)["AttachedPolicies"] == []
    (policy_name,) = iam.list_role_policies(RoleName=role_name)["PolicyNames"]
    document = iam.get_role_policy(RoleName=role_name, PolicyName=policy_name)["PolicyDocument"]
    if isinstance(document, str):
        document = json.loads(document)
    dynamodb = boto3.client("dynamodb", region_name="us-east-1")
    table_arns = {
        dynamodb.describe_table(TableName=stack.outputs[name])["Table"]["TableArn"]
        for name in ("McaasJobsTable", "McaasStepsTable")
    }
    bucket_arn = f"arn:aws:s3:::{stack.outputs['ModelBucket']}"
    for statement in document["Statement"]:
        actions, resources = as_list(statement["Action"]), as_list(statement["Resource"])
        assert "*" not in resources and not any("*" in a for a in actions), statement
        for action in actions:
            service = action.split(":")[0]
            if action == "s3:ListBucket":
                assert resources == [bucket_arn]
            elif service == "s3":
                assert resources == [f"{bucket_arn}/users/*"]
            elif service == "dynamodb":
                assert set(resources) <= table_arns


def test_ecs_env_var_mode_runs_measure_against_the_stack(
    moto_endpoint, stack, model_key, tmp_path
) -> None:
    job_id = unique("ecs-job")
    overrides = {
        "MODEL_BUCKET": stack.outputs["ModelBucket"],
        "MODEL_S3_KEY": model_key,
        "USER_ID": USER,
        "PROFILE": PROFILE,
        "JOB_ID": job_id,
        "STEP": "measure",
        "STEP_PARAMS": json.dumps({"batch_sizes": [1], "warmup": 1, "runs": 3}),
    }
    result = run_container(moto_endpoint, stack, overrides, tmp_path)
    assert result.returncode == 0, result.stderr
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert line["job_id"] == job_id and line["step"] == "measure"

    (item,) = step_items(stack, job_id)
    assert item["step"] == {"S": "0000"} and item["step_name"] == {"S": "measure"}
    assert item["user_id"] == {"S": USER} and item["profile"] == {"S": PROFILE}
    record = json.loads(item["record_json"]["S"])
    assert record["input_key"] == model_key
    assert 0.8 < record["metrics"]["accuracy"] <= 1.0
    assert record["metrics"]["latency_ms"]["b1"]["n"] >= 3  # runs is the minimum
    # measure passes its input through: nothing is written under the job's prefix.
    assert record["output_key"] == model_key
    assert bucket_keys(stack, f"users/{USER}/{PROFILE}/{job_id}/") == []


def task_overrides(stack: Stack, arn: str) -> tuple[dict[str, Any], dict[str, str]]:
    ecs = boto3.client("ecs", region_name="us-east-1")
    (task,) = ecs.describe_tasks(cluster=stack.outputs["McaasEcsCluster"], tasks=[arn])["tasks"]
    (override,) = task["overrides"]["containerOverrides"]
    assert override["name"] == stack.outputs["McaasEcsContainer"]
    return task, {pair["name"]: pair["value"] for pair in override["environment"]}


def test_ecs_job_mode_runs_a_step_and_queues_the_next_on_the_stack(
    moto_endpoint, stack, model_key, tmp_path
) -> None:
    """The API's dispatcher starts step 0; the step-runner runs it and starts step 1 itself."""
    settings = load_settings(**stack.settings_env())
    services = build_services(settings)
    spec = parse_job_spec(
        {
            "user_id": USER,
            "model": model_key,
            "profile": PROFILE,
            "steps": [
                {"name": "precision", "params": {"dtype": "float16", "timing_runs": 2}},
                {"name": "measure", "params": {"runs": 2}},
            ],
        }
    )
    assert services.jobs.create(JobRecord.new(spec))
    EcsDispatcher(settings, services).submit(spec.job_id)
    (first_arn,) = services.jobs.get(spec.job_id).ecs_tasks
    first, first_env = task_overrides(stack, first_arn)
    assert first["taskDefinitionArn"] == stack.outputs["McaasEcsTaskDefinition"]
    assert (first_env["STEP"], first_env["STEP_INDEX"]) == ("precision", "0")

    result = run_container(moto_endpoint, stack, first_env, tmp_path)
    assert result.returncode == 0, result.stderr

    job = services.jobs.get(spec.job_id)
    assert job.status == "INPROGRESS" and job.handed_off == 1
    (record,) = services.log.records(spec.job_id)
    prefix = f"users/{USER}/{PROFILE}/{spec.job_id}/00-precision/"
    assert record.output_key.startswith(prefix)
    assert record.output_key in bucket_keys(stack, prefix)
    assert len(step_items(stack, spec.job_id)) == 1
    # The step-runner queued step 1 with its own env (the family name) in the same cluster.
    first_arn_again, second_arn = job.ecs_tasks
    assert first_arn_again == first_arn
    second, second_env = task_overrides(stack, second_arn)
    assert second["taskDefinitionArn"] == stack.outputs["McaasEcsTaskDefinition"]
    assert (second_env["STEP"], second_env["STEP_INDEX"]) == ("measure", "1")
    assert second_env["MODEL_S3_KEY"] == record.output_key


def test_celery_variant_uses_the_given_redis_and_runs_a_worker_service(network) -> None:
    redis_url = "redis://redis.mcaas.internal:6379/0"
    celery = deploy(
        unique("mcaas-celery"),
        {"ImageUri": "mcaas:test", **network, "ExistingRedisUrl": redis_url},
    )
    env = celery.settings_env()
    assert env["REDIS_URL"] == redis_url and env["MCAAS_DISPATCHER"] == "celery"
    load_settings(**env).require("api").require("worker")
    assert container_env(celery, "worker")["REDIS_URL"] == redis_url
    load_settings(**container_env(celery, "worker")).require("worker")
    assert service_families(env["MCAAS_ECS_CLUSTER"]) == [
        f"{celery.name}-api",
        f"{celery.name}-worker",
    ]
