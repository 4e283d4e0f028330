"""SqliteJobStore: conditional create, update with timestamps, paged listing."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from modules.core.records import TERMINAL, JobStatus
from modules.errors import BadInputError, NotFoundError
from modules.pipeline.engine import report_key
from modules.storage.jobs import JobStore, SqliteJobStore
from tests.unit.storage.jobstore_guards import (
    check_begin_step,
    check_begin_step_with_owner,
    check_update_unless,
)


@pytest.fixture
def store(tmp_path: Path) -> SqliteJobStore:
    return SqliteJobStore(tmp_path / "db" / "jobs.sqlite")


def make_job(job_id: str = "job1", user_id: str = "alice", **extra: Any) -> dict[str, Any]:
    job: dict[str, Any] = {
        "job_id": job_id,
        "user_id": user_id,
        "status": JobStatus.QUEUED,
        "spec": {"steps": [{"name": "prune", "params": {"ratio": 0.5}}], "profile": "mcu"},
        "n_steps": 1,
    }
    job.update(extra)
    return job


def test_status_enum_and_terminal_set() -> None:
    assert [s.value for s in JobStatus] == [
        "QUEUED",
        "INPROGRESS",
        "COMPLETED",
        "FAILED",
        "REJECTED",
        "STOPPED",
    ]
    assert {"COMPLETED", "FAILED", "REJECTED", "STOPPED"} == TERMINAL
    assert JobStatus.QUEUED not in TERMINAL


def test_create_fills_defaults_and_get_returns_them(store: SqliteJobStore) -> None:
    assert isinstance(store, JobStore)
    assert store.create(make_job()) is True
    job = store.get("job1")
    assert job is not None
    assert job.status == "QUEUED"
    assert job.spec == make_job()["spec"]
    assert job.n_steps == 1
    assert job.step_index == 0
    assert job.attempts == 0
    assert job.reason is None
    assert job.created_at == job.updated_at
    assert job.created_at.endswith("+00:00")
    assert store.get("missing") is None


def test_create_is_conditional(store: SqliteJobStore) -> None:
    assert store.create(make_job())
    assert store.create(make_job(user_id="mallory", n_steps=9)) is False
    job = store.get("job1")
    assert job is not None
    assert job.user_id == "alice"
    assert job.n_steps == 1


def test_update_sets_fields_and_updated_at(store: SqliteJobStore) -> None:
    store.create(make_job())
    before = store.get("job1")
    assert before is not None
    after = store.update(
        "job1", status=JobStatus.REJECTED, reason="onnx parity failed", step_index=3, attempts=2
    )
    assert after.status == "REJECTED"
    assert after.reason == "onnx parity failed"
    assert after.step_index == 3
    assert after.attempts == 2
    assert after.updated_at > before.updated_at
    assert after.created_at == before.created_at
    assert store.get("job1") == after


def test_update_keeps_extra_fields(store: SqliteJobStore) -> None:
    store.create(make_job(model_key="users/alice/models/m1/model.pt"))
    updated = store.update("job1", report_key="users/alice/r.html", metrics={"acc": 0.9})
    assert updated.model_key == "users/alice/models/m1/model.pt"
    assert updated.metrics == {"acc": 0.9}
    assert store.get("job1") == updated


def test_update_rejects_bad_fields(store: SqliteJobStore) -> None:
    store.create(make_job())
    with pytest.raises(NotFoundError, match="nope"):
        store.update("nope", status="FAILED")
    with pytest.raises(BadInputError, match="status"):
        store.update("job1", status="done")
    with pytest.raises(BadInputError, match="user_id"):
        store.update("job1", user_id="bob")
    with pytest.raises(BadInputError, match="attempts"):
        store.update("job1", attempts=-1)
    with pytest.raises(BadInputError, match="spec"):
        store.update("job1", spec="not a dict")
    job = store.get("job1")
    assert job is not None
    assert job.status == "QUEUED"


@pytest.mark.parametrize(
    "job",
    [
        {"user_id": "alice", "spec": {}, "n_steps": 1},
        make_job(job_id="../x"),
        make_job(user_id="a/b"),
        make_job(spec=[1, 2]),
        make_job(n_steps="3"),
        make_job(status="RUNNING"),
    ],
)
def test_create_rejects_bad_jobs(store: SqliteJobStore, job: dict[str, Any]) -> None:
    with pytest.raises(BadInputError):
        store.create(job)


def test_list_is_newest_first_with_cursor_pages(store: SqliteJobStore) -> None:
    for i in range(5):
        created = f"2024-01-01T00:00:0{i}.000000+00:00"
        store.create(make_job(job_id=f"j{i}", created_at=created, updated_at=created))
    store.create(make_job(job_id="bobs", user_id="bob"))
    page1, cursor = store.list("alice", limit=2)
    assert [j.job_id for j in page1] == ["j4", "j3"]
    assert cursor is not None
    page2, cursor = store.list("alice", limit=2, cursor=cursor)
    assert [j.job_id for j in page2] == ["j2", "j1"]
    assert cursor is not None
    page3, cursor = store.list("alice", limit=2, cursor=cursor)
    assert [j.job_id for j in page3] == ["j0"]
    assert cursor is None
    exact, cursor = store.list("alice", limit=5)
    assert len(exact) == 5
    assert cursor is None
    assert [j.job_id for j in store.list("bob")[0]] == ["bobs"]
    assert store.list("carol") == ([], None)


def test_list_rejects_bad_cursor_and_limit(store: SqliteJobStore) -> None:
    with pytest.raises(BadInputError, match="cursor"):
        store.list("alice", cursor="not-base64!!")
    with pytest.raises(BadInputError, match="limit"):
        store.list("alice", limit=0)


def test_threads_share_one_store(store: SqliteJobStore) -> None:
    store.create(make_job())
    errors: list[BaseException] = []

    def bump(worker: int) -> None:
        try:
            for _ in range(10):
                job = store.get("job1")
                assert job is not None
                store.update("job1", step_index=job.step_index)
                store.create(make_job(job_id=f"t{worker}"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=bump, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    jobs, _ = store.list("alice", limit=100)
    assert len(jobs) == 5


def test_reopening_sees_the_same_data(store: SqliteJobStore) -> None:
    store.create(make_job())
    again = SqliteJobStore(store.path)
    assert again.get("job1") == store.get("job1")


def test_begin_step_is_one_guarded_write(store: SqliteJobStore) -> None:
    check_begin_step(store)


def test_begin_step_with_an_owner_refuses_a_second_owner(store: SqliteJobStore) -> None:
    check_begin_step_with_owner(store)


def test_update_unless_leaves_a_refused_status_alone(store: SqliteJobStore) -> None:
    check_update_unless(store)


def test_a_job_record_is_stored_as_before(store: SqliteJobStore) -> None:
    from modules.core.jobspec import parse_job_spec
    from modules.core.records import JobRecord

    spec = parse_job_spec(
        {"job_id": "typed", "user_id": "alice", "profile": "mobile", "steps": [{"name": "train"}]}
    )
    record = JobRecord.new(spec, model_id="m1")
    assert store.create(record)
    assert not store.create(record)
    stored = store.get("typed")
    assert stored is not None
    assert (stored.status, stored.step_index, stored.attempts) == ("QUEUED", 0, 0)
    assert stored.spec == spec.model_dump(mode="json") and stored.model_id == "m1"
    assert record.profile_name == "mobile"
    assert report_key(record) == "users/alice/mobile/typed/report.json"
