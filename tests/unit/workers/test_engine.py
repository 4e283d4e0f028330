"""The job engine (advance, advance_in_a_row, hand_off) as the workers drive it: one record
per step whatever the redeliveries, and the right status."""

from __future__ import annotations

import itertools
import json

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError
from kombu.exceptions import OperationalError

from modules.core.records import JobStatus
from modules.pipeline.engine import (
    TransientInfraError,
    advance,
    advance_in_a_row,
    fail_job,
    hand_off,
    is_transient,
    report_key,
)
from workers.dispatch import InlineDispatcher


def _client_error(code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "x"}}, "PutObject")


def test_inline_dispatcher_runs_the_chain(services, make_job) -> None:
    job_id = make_job({"name": "w_refit"}, {"name": "w_gate"})
    InlineDispatcher(services, background=False).submit(job_id)
    job = services.jobs.get(job_id)
    assert job.status == "COMPLETED" and job.reason is None
    assert job.attempts == 3
    records = services.log.records(job_id)
    assert [(r.index, r.step) for r in records] == [
        (0, "train"),
        (1, "w_refit"),
        (2, "w_gate"),
    ]
    report = json.loads(services.store.get_bytes(report_key(job)))
    assert report["status"] == "COMPLETED"
    assert [row["step"] for row in report["summary"]] == ["train", "w_refit", "w_gate"]


def test_failed_gate_rejects_and_ends_the_chain(services, make_job, calls) -> None:
    job_id = make_job({"name": "w_gate", "params": {"passed": False}}, {"name": "w_refit"})
    assert advance(job_id, 0, services).next_index == 1
    assert advance(job_id, 1, services).next_index is None
    job = services.jobs.get(job_id)
    assert job.status == "REJECTED"
    assert "told to pass=False" in job.reason
    assert calls["w_refit"] == 0
    assert len(services.log.records(job_id)) == 2


def test_redelivery_after_hand_off_is_dropped(services, make_job, calls) -> None:
    job_id = make_job({"name": "w_refit"}, {"name": "w_gate"})
    queued: list[tuple[str, int]] = []
    assert advance(job_id, 0, services).next_index == 1
    assert advance(job_id, 1, services).next_index == 2
    hand_off(job_id, 2, jobs=services.jobs, enqueue=lambda j, i: queued.append((j, i)))
    # The broker delivers step 1 again (the worker died before acking it).
    assert advance(job_id, 1, services).next_index is None
    assert queued == [(job_id, 2)]
    assert calls["w_refit"] == 1
    assert [r.index for r in services.log.records(job_id)] == [0, 1]


def test_redelivery_before_hand_off_continues_the_chain(services, make_job, calls) -> None:
    job_id = make_job({"name": "w_refit"}, {"name": "w_gate"})
    advance(job_id, 0, services)
    # The worker wrote step 1's record, then died before queueing step 2.
    assert advance(job_id, 1, services).next_index == 2
    assert advance(job_id, 1, services).next_index == 2  # not lost: queued again
    assert calls["w_refit"] == 1  # but the step body ran once
    assert [r.index for r in services.log.records(job_id)] == [0, 1]
    assert services.jobs.get(job_id).attempts == 3


def test_an_owners_message_delivered_again_resumes_where_its_worker_died(
    services, make_job, calls
) -> None:
    job_id = make_job({"name": "w_refit"}, {"name": "w_gate"})
    # Task "t-1" (sent for step 0) ran steps 0 and 1 in a row and died during step 2.
    assert advance(job_id, 0, services, owner="t-1").next_index == 1
    assert advance(job_id, 1, services, owner="t-1").next_index == 2
    assert services.jobs.begin_step(job_id, 2, owner="t-1") is not None
    # The broker delivers t-1's message (step 0) again: it goes on at step 2, where it died.
    assert advance(job_id, 0, services, owner="t-1").next_index is None
    job = services.jobs.get(job_id)
    assert job.status == "COMPLETED"
    assert (calls["w_refit"], calls["w_gate"]) == (1, 1)
    assert [r.index for r in services.log.records(job_id)] == [0, 1, 2]
    assert job.attempts == 4  # steps 0 and 1 once, step 2 twice


def test_steps_in_a_row_begin_each_after_the_records_before_it(services, make_job, calls) -> None:
    job_id = make_job({"name": "w_refit"}, {"name": "w_gate"})
    order: list[str] = []
    begin, append = services.jobs.begin_step, services.log.append

    def spy_begin(job_id, index, **kwargs):
        order.append(f"begin {index}")
        return begin(job_id, index, **kwargs)

    def spy_append(record):
        order.append(f"record {record.index}")
        return append(record)

    services.jobs.begin_step, services.log.append = spy_begin, spy_append
    assert advance_in_a_row(job_id, 0, services, owner="t-1", continue_s=60) is None
    assert services.jobs.get(job_id).status == "COMPLETED"
    # Step i + 1 is begun (in a second thread, while its body runs) only after step i's
    # record is stored, and its record only after that begin succeeded.
    assert order == ["begin 0", "record 0", "begin 1", "record 1", "begin 2", "record 2"]
    assert services.jobs.get(job_id).attempts == 3
    assert (calls["w_refit"], calls["w_gate"]) == (1, 1)


def test_past_the_budget_the_next_step_is_handed_on(services, make_job, calls) -> None:
    job_id = make_job({"name": "w_refit"}, {"name": "w_gate"})
    ticks = itertools.chain([0.0], itertools.repeat(2.0))  # step 0 ends past the 1 s budget
    assert (
        advance_in_a_row(job_id, 0, services, owner="t-1", continue_s=1, clock=lambda: next(ticks))
        == 1
    )
    job = services.jobs.get(job_id)
    assert (job.step_index, job.attempts) == (0, 1)  # step 1 not begun: it is queued


def test_a_duplicate_message_of_an_owned_step_is_dropped(services, make_job, calls) -> None:
    job_id = make_job({"name": "w_refit"})
    assert advance(job_id, 0, services, owner="t-1").next_index == 1
    queued: list[tuple[str, int]] = []
    hand_off(job_id, 1, jobs=services.jobs, enqueue=lambda j, i: queued.append((j, i)))
    # t-2 (the queued step 1) begins it; a second message for step 1 (t-3: its sender died
    # after queueing and queued it again) must not run it alongside.
    assert services.jobs.begin_step(job_id, 1, owner="t-2") is not None
    assert advance(job_id, 1, services, owner="t-3").next_index is None
    assert calls["w_refit"] == 0
    # Nor may t-1's message, delivered again: it handed step 1 on.
    assert advance(job_id, 0, services, owner="t-1").next_index is None
    assert advance(job_id, 1, services, owner="t-2").next_index is None  # the last step
    assert calls["w_refit"] == 1
    assert services.jobs.get(job_id).status == "COMPLETED"


def test_a_stopped_job_runs_no_further_step(services, make_job, calls) -> None:
    job_id = make_job({"name": "w_refit"})
    assert advance(job_id, 0, services).next_index == 1
    services.jobs.update(job_id, status=JobStatus.STOPPED.value, reason="stopped by the user")
    assert advance(job_id, 1, services).next_index is None
    assert calls["w_refit"] == 0
    assert services.jobs.get(job_id).status == "STOPPED"


def test_unknown_job_is_dropped(services) -> None:
    assert advance("nope", 0, services).next_index is None


def test_transient_error_leaves_the_job_for_a_retry(services, make_job, flaky_errors) -> None:
    job_id = make_job({"name": "w_flaky"})
    advance(job_id, 0, services)
    flaky_errors.append(EndpointConnectionError(endpoint_url="http://s3"))
    with pytest.raises(TransientInfraError, match="EndpointConnectionError"):
        advance(job_id, 1, services)
    assert services.jobs.get(job_id).status == "INPROGRESS"
    assert services.log.get(job_id, 1) is None
    assert advance(job_id, 1, services).next_index is None  # the retry
    job = services.jobs.get(job_id)
    assert job.status == "COMPLETED"
    assert job.attempts == 3
    assert [r.index for r in services.log.records(job_id)] == [0, 1]


def test_a_real_error_fails_the_job_and_propagates(services, make_job, flaky_errors) -> None:
    job_id = make_job({"name": "w_flaky"})
    advance(job_id, 0, services)
    flaky_errors.append(_client_error("AccessDenied"))
    with pytest.raises(ClientError):
        advance(job_id, 1, services)
    job = services.jobs.get(job_id)
    assert job.status == "FAILED"
    assert job.reason.startswith("step 1 (w_flaky) crashed: ClientError")


def test_fail_job_leaves_finished_jobs_alone(services, make_job) -> None:
    job_id = make_job()
    InlineDispatcher(services, background=False).submit(job_id)
    fail_job(services, job_id, "late")
    assert services.jobs.get(job_id).status == "COMPLETED"
    other = make_job(job_id="job2")
    fail_job(services, other, "gave up")
    assert services.jobs.get(other).reason == "gave up"


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (EndpointConnectionError(endpoint_url="http://x"), True),
        (ReadTimeoutError(endpoint_url="http://x"), True),
        (OperationalError("broker down"), True),
        (_client_error("ThrottlingException"), True),
        (_client_error("ProvisionedThroughputExceededException"), True),
        (_client_error("SlowDown"), True),
        (_client_error("AccessDenied"), False),
        (_client_error("NoSuchBucket"), False),
        (_client_error("ConditionalCheckFailedException"), False),
        (ValueError("bad"), False),
        (RuntimeError("bug"), False),
    ],
)
def test_is_transient(error: BaseException, transient: bool) -> None:
    assert is_transient(error) is transient


def test_with_a_step_cache_the_log_is_queried_once_per_job(
    services, make_job, calls, monkeypatch
) -> None:
    from modules.pipeline.step_cache import StepCache

    job_id = make_job({"name": "w_refit"}, {"name": "w_gate"})
    real_records = services.log.records
    queries: list[str] = []

    def counting_records(job: str):
        queries.append(job)
        return real_records(job)

    monkeypatch.setattr(services.log, "records", counting_records)
    cache = StepCache()
    assert advance(job_id, 0, services, cache=cache).next_index == 1
    # A redelivered step the cache knows is not run again, and asks nothing.
    assert advance(job_id, 1, services, cache=cache).next_index == 2
    assert advance(job_id, 1, services, cache=cache).next_index == 2
    assert advance(job_id, 2, services, cache=cache).next_index is None
    assert queries == [job_id]  # step 0's; steps 1, 2 and the report used the cache
    assert calls["w_refit"] == 1
    job = services.jobs.get(job_id)
    assert job.status == "COMPLETED"
    report = json.loads(services.store.get_bytes(report_key(job)))
    assert [row["step"] for row in report["summary"]] == ["train", "w_refit", "w_gate"]


def test_a_job_restarted_past_the_cap_fails_instead_of_running(services, make_job, calls) -> None:
    job_id = make_job({"name": "w_refit"})
    assert advance(job_id, 0, services, owner="m0").next_index == 1
    # Two deliveries of step 1 began and died with their worker (nothing recorded).
    for _ in range(2):
        assert services.jobs.begin_step(job_id, 1, owner="m1") is not None
    assert advance(job_id, 1, services, owner="m1", max_restarts=1).next_index is None
    job = services.jobs.get(job_id)
    assert job.status == "FAILED"
    assert "step 1 (w_refit) was started again 2 times" in job.reason
    assert "limit 1, MCAAS_MAX_REDELIVERIES" in job.reason
    assert calls["w_refit"] == 0
    assert services.log.get(job_id, 1) is None


def test_restarts_within_the_cap_still_run(services, make_job, calls) -> None:
    job_id = make_job({"name": "w_refit"})
    assert advance(job_id, 0, services, owner="m0").next_index == 1
    assert services.jobs.begin_step(job_id, 1, owner="m1") is not None
    assert advance(job_id, 1, services, owner="m1", max_restarts=1).next_index is None
    job = services.jobs.get(job_id)
    assert (job.status, job.attempts) == ("COMPLETED", 3)
    assert calls["w_refit"] == 1


def test_a_memory_error_fails_the_job_as_out_of_memory(services, make_job, flaky_errors) -> None:
    job_id = make_job({"name": "w_flaky"})
    flaky_errors.append(MemoryError("Unable to allocate 8.00 PiB"))
    assert advance(job_id, 0, services).next_index == 1
    with pytest.raises(MemoryError):
        advance(job_id, 1, services)
    job = services.jobs.get(job_id)
    assert job.status == "FAILED"
    assert job.reason == (
        "step 1 (w_flaky) ran out of memory: MemoryError: Unable to allocate 8.00 PiB"
    )
