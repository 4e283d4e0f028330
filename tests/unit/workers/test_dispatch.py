"""Dispatchers chosen by settings; what each sends. (Real Redis and moto ECS: integration.)"""

from __future__ import annotations

import json
from typing import Any

import pytest

from modules.pipeline.engine import advance
from modules.pipeline.settings import SettingsError, build_services
from modules.storage.artifacts import S3Store
from workers.dispatch import (
    TASK_NAME,
    CeleryDispatcher,
    DispatchError,
    EcsDispatcher,
    InlineDispatcher,
    make_dispatcher,
)

ECS = {
    "dispatcher": "ecs",
    "ecs_cluster": "mcaas",
    "ecs_task_definition": "mcaas-worker:3",
    "ecs_subnets": "subnet-1, subnet-2",
    "ecs_security_groups": "sg-1",
}


class RecordingEcs:
    """Stands in for boto3's ECS client: records run_task calls and answers like ECS."""

    def __init__(self, failures: list[dict[str, str]] | None = None) -> None:
        self.calls: list[dict[str, Any]] = []
        self.failures = failures or []

    def run_task(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(kwargs)
        if self.failures:
            return {"tasks": [], "failures": self.failures}
        return {"tasks": [{"taskArn": f"arn:task/{len(self.calls)}"}], "failures": []}


class RecordingCelery:
    def __init__(self) -> None:
        self.sent: list[tuple[str, list[Any], str, int]] = []

    def send_task(self, name: str, *, args: list[Any], queue: str, priority: int) -> None:
        self.sent.append((name, args, queue, priority))


def env_of(call: dict[str, Any]) -> dict[str, str]:
    (override,) = call["overrides"]["containerOverrides"]
    assert override["name"] == "worker"
    return {pair["name"]: pair["value"] for pair in override["environment"]}


def test_settings_choose_the_dispatcher(settings_for) -> None:
    inline = settings_for()
    assert isinstance(make_dispatcher(inline, build_services(inline)), InlineDispatcher)
    celery = settings_for(dispatcher="celery", redis_url="redis://h:6379/0", queue="q9")
    dispatcher = make_dispatcher(celery, build_services(celery))
    assert isinstance(dispatcher, CeleryDispatcher) and dispatcher.queue == "q9"
    ecs = settings_for(store_url="s3://models-bucket", **ECS)
    assert isinstance(make_dispatcher(ecs, build_services(ecs)), EcsDispatcher)


def test_celery_dispatcher_sends_ids_only() -> None:
    app = RecordingCelery()
    dispatcher = CeleryDispatcher(app, queue="q1")
    dispatcher.submit("job1")
    dispatcher.enqueue("job1", 3)
    # A started job's next step is served before jobs that have not started (0 = first).
    assert app.sent == [(TASK_NAME, ["job1", 0], "q1", 6), (TASK_NAME, ["job1", 3], "q1", 0)]
    json.dumps(app.sent)  # JSON-serializable: ids, not objects


def test_ecs_dispatcher_needs_its_settings_and_s3(settings_for, services) -> None:
    missing = settings_for(**{**ECS, "ecs_subnets": None})
    with pytest.raises(SettingsError, match="MCAAS_ECS_SUBNETS"):
        EcsDispatcher(missing, services)
    with pytest.raises(DispatchError, match="S3 store"):
        EcsDispatcher(settings_for(**ECS), services)


def test_ecs_dispatcher_passes_the_env_contract(settings_for, services, make_job) -> None:
    job_id = make_job({"name": "w_refit", "params": {"passed": True}})
    advance(job_id, 0, services)
    client = RecordingEcs()
    ecs_services = services._replace(store=S3Store("models-bucket"))
    dispatcher = EcsDispatcher(settings_for(**ECS), ecs_services, client=client)
    dispatcher.submit(job_id)
    dispatcher.enqueue(job_id, 1)
    first, second = client.calls
    assert first["cluster"] == "mcaas" and first["taskDefinition"] == "mcaas-worker:3"
    assert first["launchType"] == "FARGATE" and first["count"] == 1
    vpc = first["networkConfiguration"]["awsvpcConfiguration"]
    assert vpc["subnets"] == ["subnet-1", "subnet-2"] and vpc["securityGroups"] == ["sg-1"]
    assert env_of(second) == {
        "MODEL_BUCKET": "models-bucket",
        "MODEL_S3_KEY": services.log.get(job_id, 0).output_key,
        "USER_ID": "alice",
        "PROFILE": "edge-8mb",
        "JOB_ID": job_id,
        "STEP": "w_refit",
        "STEP_PARAMS": '{"passed": true}',
        "STEP_INDEX": "1",
        "DATASET": "digits",
    }
    # Step 0 is `train`: it has no input model.
    assert env_of(first)["MODEL_S3_KEY"] == "" and env_of(first)["STEP"] == "train"
    assert services.jobs.get(job_id).ecs_tasks == ["arn:task/1", "arn:task/2"]


def test_ecs_failures_become_dispatch_errors(settings_for, services, make_job) -> None:
    job_id = make_job({"name": "w_refit"})
    client = RecordingEcs(failures=[{"reason": "RESOURCE:MEMORY"}])
    ecs_services = services._replace(store=S3Store("models-bucket"))
    dispatcher = EcsDispatcher(settings_for(**ECS), ecs_services, client=client)
    with pytest.raises(DispatchError, match="RESOURCE:MEMORY"):
        dispatcher.submit(job_id)
    with pytest.raises(DispatchError, match="no record yet"):
        dispatcher.enqueue(job_id, 1)
    with pytest.raises(DispatchError, match="no step 2"):
        dispatcher.enqueue(job_id, 2)


class _Control:
    def __init__(self) -> None:
        self.revoked: list[tuple[str, dict[str, object]]] = []

    def revoke(self, task_id: str, **options: object) -> None:
        self.revoked.append((task_id, options))


class _App:
    def __init__(self) -> None:
        self.control = _Control()


def test_celery_terminate_revokes_the_owner_task_with_sigkill() -> None:
    from modules.core.jobspec import parse_job_spec
    from modules.core.records import JobRecord
    from modules.pipeline.engine import StepTerminator
    from workers.dispatch import CeleryDispatcher

    app = _App()
    dispatcher = CeleryDispatcher(app, queue="q")
    assert isinstance(dispatcher, StepTerminator)
    spec = parse_job_spec(
        {"user_id": "alice", "steps": [{"name": "train", "params": {"model": "knn"}}]}
    )
    job = JobRecord.new(spec)
    dispatcher.terminate(job)  # never begun: nothing to revoke
    assert app.control.revoked == []
    dispatcher.terminate(job.model_copy(update={"owner": "task-42"}))
    assert app.control.revoked == [("task-42", {"terminate": True, "signal": "SIGKILL"})]


class _StoppingEcs(RecordingEcs):
    def __init__(self) -> None:
        super().__init__()
        self.stopped: list[dict[str, object]] = []

    def stop_task(self, **kwargs: object) -> None:
        self.stopped.append(kwargs)


def test_ecs_terminate_stops_the_jobs_latest_task(settings_for, services, make_job) -> None:
    job_id = make_job({"name": "w_refit"})
    advance(job_id, 0, services)
    client = _StoppingEcs()
    ecs_services = services._replace(store=S3Store("models-bucket"))
    dispatcher = EcsDispatcher(settings_for(**ECS), ecs_services, client=client)
    dispatcher.terminate(services.jobs.get(job_id))  # no task started yet
    assert client.stopped == []
    dispatcher.submit(job_id)
    dispatcher.enqueue(job_id, 1)
    dispatcher.terminate(services.jobs.get(job_id))
    assert client.stopped == [
        {"cluster": "mcaas", "task": "arn:task/2", "reason": "stopped by the user"}
    ]
