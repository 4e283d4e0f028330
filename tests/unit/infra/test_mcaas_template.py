"""infra/mcaas.yaml read as data: least-privilege IAM, settings names, table schemas, lint."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from cfnlint.api import lint_file
from cfnlint.decode import cfn_yaml

from modules.pipeline.settings import ENV_NAMES
from modules.storage.jobs import USER_INDEX
from modules.storage.ttl import TTL_ATTRIBUTE

TEMPLATE = Path(__file__).resolve().parents[3] / "infra" / "mcaas.yaml"

# Services whose actions read or write the users' data.
DATA_SERVICES = ("s3", "dynamodb")
# Container env the image reads that is not one of our Settings.
NON_SETTINGS_ENV = {"TORCH_FORCE_WEIGHTS_ONLY_LOAD"}
# The per-step ECS contract: RunTask overrides set these, a task definition must not.
PER_STEP_ENV = {"MODEL_S3_KEY", "USER_ID", "PROFILE", "JOB_ID", "STEP", "STEP_PARAMS", "STEP_INDEX"}
TASK_DEFINITIONS = ("ApiTaskDefinition", "WorkerTaskDefinition", "StepRunnerTaskDefinition")
SETTINGS_DESCRIPTION = re.compile(r"^([A-Z][A-Z0-9_]+): ")


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    loaded: dict[str, Any] = cfn_yaml.load(str(TEMPLATE))
    return loaded


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def role_statements(template: dict[str, Any], role: str) -> list[dict[str, Any]]:
    """Every policy statement that applies to `role`: its inline policies and attached ones."""
    resources = template["Resources"]
    props = resources[role]["Properties"]
    assert "ManagedPolicyArns" not in props, f"{role} must not attach managed policies"
    statements: list[dict[str, Any]] = []
    for policy in props.get("Policies", []):
        statements.extend(as_list(policy["PolicyDocument"]["Statement"]))
    for resource in resources.values():
        if resource["Type"] in {"AWS::IAM::Policy", "AWS::IAM::ManagedPolicy"}:
            roles = resource["Properties"].get("Roles", [])
            if {"Ref": role} in roles:
                statements.extend(as_list(resource["Properties"]["PolicyDocument"]["Statement"]))
    return statements


def policy_problems(statements: list[dict[str, Any]]) -> list[str]:
    """Wildcard actions, Not* elements, and data actions on Resource "*"."""
    problems: list[str] = []
    for statement in statements:
        sid = statement.get("Sid", "?")
        problems.extend(
            f"{sid}: uses {key}" for key in ("NotAction", "NotResource") if key in statement
        )
        actions = [str(action) for action in as_list(statement.get("Action", []))]
        problems.extend(f"{sid}: wildcard action {a!r}" for a in actions if "*" in a)
        data_actions = [a for a in actions if a.split(":")[0].lower() in DATA_SERVICES]
        for resource in as_list(statement.get("Resource", [])):
            text = resource.get("Fn::Sub", resource) if isinstance(resource, dict) else resource
            if data_actions and isinstance(text, str) and re.fullmatch(r"(arn:[^*]*:)?\*", text):
                problems.append(f"{sid}: data actions {data_actions} on Resource {text!r}")
    return problems


def test_policy_check_catches_wildcards() -> None:
    bad = [
        {"Sid": "A", "Effect": "Allow", "Action": "s3:*", "Resource": "arn:aws:s3:::b/*"},
        {"Sid": "B", "Effect": "Allow", "Action": ["dynamodb:*"], "Resource": "arn:t"},
        {"Sid": "C", "Effect": "Allow", "Action": "s3:GetObject", "Resource": "*"},
        {"Sid": "D", "Effect": "Allow", "Action": "dynamodb:GetItem", "Resource": ["x", "*"]},
        {"Sid": "E", "Effect": "Allow", "NotAction": "iam:*", "Resource": "x"},
        {"Sid": "F", "Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::*"},
    ]
    problems = policy_problems(bad)
    assert [p.split(":")[0] for p in problems] == ["A", "B", "C", "D", "E", "F"]


def test_every_task_role_avoids_wildcards(template) -> None:
    for role in ("StepRunnerTaskRole", "WorkerTaskRole", "ApiTaskRole"):
        statements = role_statements(template, role)
        assert statements, role
        assert policy_problems(statements) == [], role


def test_step_runner_reads_and_writes_only_users_objects_and_its_tables(template) -> None:
    statements = role_statements(template, "StepRunnerTaskRole")
    assert all(s["Effect"] == "Allow" for s in statements)
    by_service: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for statement in statements:
        for action in as_list(statement["Action"]):
            by_service.setdefault(action.split(":")[0], []).append((action, statement))
    assert set(by_service) == {"s3", "dynamodb", "ecs", "iam"}

    users_objects = {"Fn::Sub": "${ArtifactBucket.Arn}/users/*"}
    for action, statement in by_service["s3"]:
        if action == "s3:ListBucket":
            assert statement["Resource"] == {"Fn::GetAtt": ["ArtifactBucket", "Arn"]}
            assert statement["Condition"] == {"StringLike": {"s3:prefix": ["users/*"]}}
        else:
            assert action in {"s3:GetObject", "s3:PutObject"}
            assert as_list(statement["Resource"]) == [users_objects]

    tables = {"StepsTable": set(), "JobsTable": set()}
    for action, statement in by_service["dynamodb"]:
        for resource in as_list(statement["Resource"]):
            name, attribute = resource["Fn::GetAtt"]
            assert attribute == "Arn"
            tables[name].add(action)
    # Step records are put once (conditional put); the job record is only updated.
    assert tables["StepsTable"] == {"dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:Query"}
    assert tables["JobsTable"] == {"dynamodb:GetItem", "dynamodb:UpdateItem"}

    # Job mode queues the next step: RunTask on its own family in its cluster, PassRole to ECS.
    ((run_action, run),) = by_service["ecs"]
    assert run_action == "ecs:RunTask"
    assert run["Resource"]["Fn::Sub"].endswith(":task-definition/${AWS::StackName}-step-runner:*")
    assert run["Condition"] == {"ArnEquals": {"ecs:cluster": {"Fn::GetAtt": ["Cluster", "Arn"]}}}
    ((pass_action, passing),) = by_service["iam"]
    assert pass_action == "iam:PassRole"
    assert passing["Condition"] == {
        "StringEquals": {"iam:PassedToService": "ecs-tasks.amazonaws.com"}
    }


def test_required_parameters_are_the_image_and_the_network(template) -> None:
    required = {name for name, p in template["Parameters"].items() if "Default" not in p}
    assert required == {"ImageUri", "VpcId", "SubnetIds"}
    for name, parameter in template["Parameters"].items():
        assert parameter.get("Description"), name


def container(template: dict[str, Any], task_definition: str) -> dict[str, Any]:
    props = template["Resources"][task_definition]["Properties"]
    (definition,) = props["ContainerDefinitions"]
    result: dict[str, Any] = definition
    return result


def env_names(definition: dict[str, Any]) -> list[str]:
    return [pair["Name"] for pair in definition["Environment"]]


def container_env(template: dict[str, Any], task_definition: str) -> dict[str, Any]:
    return {p["Name"]: p["Value"] for p in container(template, task_definition)["Environment"]}


def test_container_env_names_are_settings_the_service_reads(template) -> None:
    known = set(ENV_NAMES.values()) | NON_SETTINGS_ENV
    for task_definition in TASK_DEFINITIONS:
        names = env_names(container(template, task_definition))
        assert len(names) == len(set(names)), task_definition
        assert set(names) <= known, (task_definition, set(names) - known)
        assert not set(names) & PER_STEP_ENV, task_definition


def test_step_runner_is_the_ecs_env_var_mode(template) -> None:
    runner = container(template, "StepRunnerTaskDefinition")
    assert runner["Command"] == ["python", "-m", "workers.ecs_entry"]
    env = container_env(template, "StepRunnerTaskDefinition")
    assert env["MCAAS_ECS_CONTAINER"] == runner["Name"]
    family = template["Resources"]["StepRunnerTaskDefinition"]["Properties"]["Family"]
    assert env["MCAAS_ECS_TASK_DEFINITION"] == family
    assert "REDIS_URL" not in env and env["MCAAS_DISPATCHER"] == "ecs"
    # moto's (and ECS's) Fargate RunTask wants cpu and memory on the container too.
    assert runner["Cpu"] == {"Ref": "StepRunnerCpu"}
    assert runner["Memory"] == {"Ref": "StepRunnerMemory"}
    api_env = container_env(template, "ApiTaskDefinition")
    assert api_env["MCAAS_ECS_CONTAINER"] == runner["Name"]
    assert api_env["MCAAS_ECS_TASK_DEFINITION"] == {"Ref": "StepRunnerTaskDefinition"}


def test_settings_outputs_are_named_after_their_env_variables(template) -> None:
    settings_outputs = {}
    for key, output in template["Outputs"].items():
        match = SETTINGS_DESCRIPTION.match(output["Description"])
        if match:
            settings_outputs[match.group(1)] = key
    assert set(settings_outputs) <= set(ENV_NAMES.values())
    for env, key in settings_outputs.items():
        assert key == "".join(part.capitalize() for part in env.split("_"))
    assert {
        "MODEL_BUCKET",
        "MCAAS_JOBS_TABLE",
        "MCAAS_STEPS_TABLE",
        "MCAAS_ECS_CLUSTER",
        "MCAAS_ECS_TASK_DEFINITION",
        "MCAAS_ECS_SUBNETS",
        "MCAAS_ECS_SECURITY_GROUPS",
        "REDIS_URL",
    } <= set(settings_outputs)


def key_schema(table: dict[str, Any]) -> list[tuple[str, str]]:
    return [(k["AttributeName"], k["KeyType"]) for k in table["KeySchema"]]


def test_tables_match_the_stores_and_are_on_demand_recoverable_with_ttl(template) -> None:
    resources = template["Resources"]
    jobs, steps = resources["JobsTable"]["Properties"], resources["StepsTable"]["Properties"]
    assert key_schema(jobs) == [("job_id", "HASH")]
    (index,) = jobs["GlobalSecondaryIndexes"]
    assert index["IndexName"] == USER_INDEX
    assert key_schema(index) == [("user_id", "HASH"), ("created_at", "RANGE")]
    assert key_schema(steps) == [("job_id", "HASH"), ("step", "RANGE")]
    for name in ("JobsTable", "StepsTable", "ApiKeysTable"):
        table = resources[name]
        props = table["Properties"]
        assert props["BillingMode"] == "PAY_PER_REQUEST", name
        assert props["PointInTimeRecoverySpecification"] == {"PointInTimeRecoveryEnabled": True}
        assert props["TimeToLiveSpecification"] == {"AttributeName": TTL_ATTRIBUTE, "Enabled": True}
        assert table["DeletionPolicy"] == "Retain", name
    # Every container that writes records writes expires_at, with the artifacts' lifetime.
    for task_definition in TASK_DEFINITIONS:
        env = container_env(template, task_definition)
        assert env["MCAAS_RECORD_TTL_DAYS"] == {"Ref": "ArtifactExpirationDays"}, task_definition


def test_bucket_is_versioned_encrypted_private_with_lifecycle(template) -> None:
    bucket = template["Resources"]["ArtifactBucket"]
    props = bucket["Properties"]
    assert bucket["DeletionPolicy"] == "Retain"
    assert props["VersioningConfiguration"] == {"Status": "Enabled"}
    (sse,) = props["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    assert sse["ServerSideEncryptionByDefault"]["SSEAlgorithm"] in {"AES256", "aws:kms"}
    assert set(props["PublicAccessBlockConfiguration"].values()) == {True}
    assert len(props["PublicAccessBlockConfiguration"]) == 4
    rules = {rule["Id"]: rule for rule in props["LifecycleConfiguration"]["Rules"]}
    assert rules["expire-user-artifacts"]["Prefix"] == "users/"
    assert "NoncurrentVersionExpiration" in rules["expire-old-versions"]
    assert "AbortIncompleteMultipartUpload" in rules["abort-incomplete-uploads"]


def test_redis_is_created_only_without_an_existing_one(template) -> None:
    conditions = template["Conditions"]
    assert conditions["CreateRedis"] == {
        "Fn::And": [{"Condition": "UseCelery"}, {"Fn::Equals": [{"Ref": "ExistingRedisUrl"}, ""]}]
    }
    for name in ("Redis", "RedisSubnetGroup", "RedisSecurityGroup"):
        assert template["Resources"][name]["Condition"] == "CreateRedis", name


def test_cfn_lint_is_clean() -> None:
    matches = lint_file(TEMPLATE)
    assert [str(match) for match in matches] == []
