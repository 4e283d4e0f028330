"""The Celery app's configuration and the run_step task, applied in-process (eager).

Broker behaviour (acks, redelivery) is tested against the real Redis in
tests/integration/service; here the task body, its retries and its hand-off are.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from botocore.exceptions import EndpointConnectionError
from celery.exceptions import TimeLimitExceeded

from modules.core.registry import register_step, unregister_step
from modules.core.step import StepOutput
from modules.pipeline.settings import SettingsError, get_settings
from tests.unit.workers.conftest import ToyParams
from workers.celery_app import celery_app, celery_config
from workers.names import TASK_NAME
from workers.tasks import (
    StepOutOfMemory,
    backoff_s,
    run_step_task,
    worker_services,
    worker_step_cache,
)


def test_celery_config_is_made_for_long_idempotent_steps(settings_for) -> None:
    settings = settings_for(
        dispatcher="celery",
        redis_url="redis://r:6379/2",
        queue="steps-q",
        task_soft_time_limit_s=100,
        task_time_limit_s=120,
        visibility_timeout_s=300,
    )
    config = celery_config(settings)
    assert config["broker_url"] == "redis://r:6379/2"
    assert config["task_acks_late"] is True
    assert config["task_reject_on_worker_lost"] is True
    assert config["worker_prefetch_multiplier"] == 1
    assert (config["task_soft_time_limit"], config["task_time_limit"]) == (100, 120)
    transport = config["broker_transport_options"]
    assert transport["visibility_timeout"] == 300
    assert (transport["unacked_restore_interval"], transport["unacked_restore_throttle"]) == (30, 1)
    assert config["task_serializer"] == "json" and config["accept_content"] == ["json"]
    assert [q.name for q in config["task_queues"]] == ["steps-q"]
    assert config["task_routes"] == {TASK_NAME: {"queue": "steps-q"}}
    assert config["task_ignore_result"] is True


def test_the_inline_budget_must_leave_a_step_its_soft_limit(settings_for) -> None:
    settings = settings_for(task_soft_time_limit_s=60, continue_inline_s=60)
    with pytest.raises(Exception, match="MCAAS_CONTINUE_INLINE_S below"):
        settings.require("worker")
    assert settings_for(task_soft_time_limit_s=60, continue_inline_s=0).require("worker")


def test_unsafe_time_limits_are_refused(settings_for) -> None:
    settings = settings_for(task_time_limit_s=600, visibility_timeout_s=600)
    with pytest.raises(Exception, match="MCAAS_VISIBILITY_TIMEOUT_S above"):
        settings.require("worker")
    settings = settings_for(task_soft_time_limit_s=600, task_time_limit_s=600)
    with pytest.raises(Exception, match="MCAAS_TASK_SOFT_TIME_LIMIT_S below"):
        settings.require("worker")


def test_backoff_grows_and_is_capped() -> None:
    for retries in range(12):
        delay = backoff_s(retries)
        assert 0.5 * min(60, 2**retries) <= delay <= min(60, 2**retries)


@pytest.fixture
def worker_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """The env a worker process would have, pointing at the tests' embedded stores."""
    monkeypatch.setenv("MCAAS_STORE_URL", str(tmp_path / "store"))
    monkeypatch.setenv("MCAAS_JOBS_DB", str(tmp_path / "jobs.sqlite"))
    monkeypatch.setenv("MCAAS_CSV_LOG", str(tmp_path / "steps.csv"))
    monkeypatch.setenv("MCAAS_STEP_LOG", "csv")
    monkeypatch.setenv("MCAAS_DISPATCHER", "inline")
    monkeypatch.setenv("MCAAS_TASK_MAX_RETRIES", "2")
    get_settings.cache_clear()
    worker_services.cache_clear()
    worker_step_cache.cache_clear()  # job ids repeat across tests; a worker's never do
    previous = celery_app.conf.broker_url
    celery_app.conf.broker_url = "memory://"  # hand-offs land in an in-process queue
    yield
    celery_app.conf.broker_url = previous
    get_settings.cache_clear()
    worker_services.cache_clear()
    worker_step_cache.cache_clear()


def _queued(queue: str) -> list[list[object]]:
    with celery_app.connection_for_write() as conn:
        simple = conn.SimpleQueue(queue)
        bodies = []
        while simple.qsize():
            message = simple.get(timeout=1)
            bodies.append(message.payload[0])
            message.ack()
        simple.close()
    return bodies


def test_task_runs_the_next_steps_itself_within_its_budget(
    worker_env, services, make_job, calls
) -> None:
    job_id = make_job({"name": "w_refit"}, {"name": "w_gate"})
    result = run_step_task.apply(args=[job_id, 0], task_id="task-1")
    assert result.successful()
    assert _queued("mcaas.steps") == []  # nothing handed to the broker
    job = services.jobs.get(job_id)
    assert (job.status, job.owner, job.attempts) == ("COMPLETED", "task-1", 3)
    assert "handed_off" not in job
    assert (calls["w_refit"], calls["w_gate"]) == (1, 1)
    assert [r.index for r in services.log.records(job_id)] == [0, 1, 2]


def test_a_stop_between_steps_ends_the_task(worker_env, services, make_job, calls) -> None:
    @register_step("w_stop_here", params=ToyParams, accepts={"sklearn"})
    def stop_here(model, data, params, ctx):
        """Stand in for the user pressing stop while this step runs (once it has begun)."""
        deadline = time.monotonic() + 30
        while services.jobs.get(ctx.job_id).step_index != ctx.step_index:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        services.jobs.update(ctx.job_id, status="STOPPED", reason="stopped by the user")
        return StepOutput(metrics={})

    try:
        job_id = make_job({"name": "w_stop_here"}, {"name": "w_refit"}, job_id="job2")
        assert run_step_task.apply(args=[job_id, 0]).successful()
    finally:
        unregister_step("w_stop_here")
    job = services.jobs.get(job_id)
    assert (job.status, job.step_index) == ("STOPPED", 1)
    # Step 2 was run in a row: its body started while its begin was on the way, and the
    # refused begin dropped its result. Nothing after the stop is stored.
    assert calls["w_refit"] == 1
    assert [r.index for r in services.log.records(job_id)] == [0, 1]
    prefix = f"users/alice/edge-8mb/{job_id}/"
    assert services.store.list(prefix + "00-train/") != []  # where the steps do store
    assert services.store.list(prefix + "02-w_refit/") == []


def test_task_runs_a_step_and_queues_the_next(worker_env, services, make_job, monkeypatch) -> None:
    monkeypatch.setenv("MCAAS_CONTINUE_INLINE_S", "0")
    get_settings.cache_clear()
    job_id = make_job({"name": "w_refit"})
    result = run_step_task.apply(args=[job_id, 0])
    assert result.successful()
    assert _queued("mcaas.steps") == [[job_id, 1]]
    job = services.jobs.get(job_id)
    assert job.handed_off == 1 and job.status == "INPROGRESS"
    assert run_step_task.apply(args=[job_id, 1]).successful()
    assert services.jobs.get(job_id).status == "COMPLETED"
    assert _queued("mcaas.steps") == []


def test_task_retries_transient_errors(worker_env, services, make_job, calls, flaky_errors) -> None:
    job_id = make_job({"name": "w_flaky"})
    flaky_errors.extend([EndpointConnectionError(endpoint_url="http://s3")] * 2)
    # Step 1 runs in the task sent for step 0; each retry resumes there, not at step 0.
    result = run_step_task.apply(args=[job_id, 0])
    assert result.successful()
    assert calls["w_flaky"] == 3
    job = services.jobs.get(job_id)
    assert job.status == "COMPLETED" and job.attempts == 4
    assert len(services.log.records(job_id)) == 2


def test_a_transient_error_beginning_the_next_step_is_retried(
    worker_env, services, make_job, calls
) -> None:
    job_id = make_job({"name": "w_refit"})
    jobs = worker_services().jobs
    begin = jobs.begin_step
    failures = [EndpointConnectionError(endpoint_url="http://dynamodb")]

    def flaky_begin(job_id, index, **kwargs):
        if index == 1 and failures:
            raise failures.pop()  # step 1, begun while its body runs
        return begin(job_id, index, **kwargs)

    jobs.begin_step = flaky_begin
    assert run_step_task.apply(args=[job_id, 0], task_id="task-1").successful()
    job = services.jobs.get(job_id)
    assert job.status == "COMPLETED" and failures == []
    # Step 1 was begun while its body ran; the error came before anything of it was stored.
    # The retry begins step 0 again (attempt 2), finds its record, and runs step 1 again
    # (attempt 3), which stores its one record this time.
    assert job.attempts == 3 and calls["w_refit"] == 2
    assert [r.index for r in services.log.records(job_id)] == [0, 1]


def test_task_gives_up_after_the_retry_budget(
    worker_env, services, make_job, calls, flaky_errors
) -> None:
    job_id = make_job({"name": "w_flaky"})
    flaky_errors.extend([EndpointConnectionError(endpoint_url="http://s3")] * 5)
    result = run_step_task.apply(args=[job_id, 0])
    assert result.failed()
    assert calls["w_flaky"] == 3  # the first try and MCAAS_TASK_MAX_RETRIES=2 retries
    job = services.jobs.get(job_id)
    assert job.status == "FAILED"
    assert "infrastructure error after 2 retries" in job.reason


def test_hard_time_limit_fails_the_job(worker_env, services, make_job) -> None:
    job_id = make_job({"name": "w_refit"})
    services.jobs.begin_step(job_id, 1, owner="task-1")
    # The task was sent for step 0 and had gone on to step 1: the reason names step 1.
    run_step_task.on_failure(TimeLimitExceeded(120), "task-1", (job_id, 0), {}, None)
    job = services.jobs.get(job_id)
    assert job.status == "FAILED"
    assert job.reason == "step 1 exceeded the hard time limit and was killed"


def test_the_step_cache_follows_its_setting(worker_env, monkeypatch) -> None:
    cache = worker_step_cache()
    assert cache is not None and cache.max_bytes == 256 * 2**20
    monkeypatch.setenv("MCAAS_WORKER_CACHE_MB", "0")
    get_settings.cache_clear()
    worker_step_cache.cache_clear()
    assert worker_step_cache() is None
    monkeypatch.setenv("MCAAS_WORKER_CACHE_MB", "-1")
    get_settings.cache_clear()
    worker_step_cache.cache_clear()
    with pytest.raises(SettingsError, match="MCAAS_WORKER_CACHE_MB"):
        worker_step_cache()


def test_a_memory_error_leaves_the_task_as_a_plain_failure(
    worker_env, services, make_job, flaky_errors
) -> None:
    """Celery's main process would re-raise a task's MemoryError and exit the worker."""
    job_id = make_job({"name": "w_flaky"})
    flaky_errors.append(MemoryError())
    result = run_step_task.apply(args=[job_id, 0], task_id="task-oom")
    assert result.failed()
    assert isinstance(result.result, StepOutOfMemory)
    assert not isinstance(result.result, MemoryError)
    assert "out of memory: an allocation was refused" in str(result.result)
    job = services.jobs.get(job_id)
    assert job.status == "FAILED"
    assert (
        job.reason == "step 1 (w_flaky) ran out of memory: MemoryError: an allocation was refused"
    )


def test_the_task_caps_restarts_from_the_setting(
    worker_env, monkeypatch, services, make_job, calls
) -> None:
    monkeypatch.setenv("MCAAS_MAX_REDELIVERIES", "0")
    get_settings.cache_clear()
    job_id = make_job({"name": "w_refit"})
    assert services.jobs.begin_step(job_id, 0, owner="task-dies") is not None  # it died
    assert run_step_task.apply(args=[job_id, 0], task_id="task-dies").successful()
    job = services.jobs.get(job_id)
    assert job.status == "FAILED" and "MCAAS_MAX_REDELIVERIES" in job.reason
    assert calls["w_refit"] == 0
