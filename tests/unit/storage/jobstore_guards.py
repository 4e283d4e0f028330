"""The guarded writes every JobStore must implement the same way: begin_step (with and
without an owner) and update_unless. Imported by the SQLite unit tests and the DynamoDB
(moto) integration tests."""

from __future__ import annotations

import pytest

from modules.errors import NotFoundError
from modules.storage.jobs import JobStatus, JobStore


def _job(job_id: str) -> dict[str, object]:
    return {
        "job_id": job_id,
        "user_id": "alice",
        "spec": {"steps": [{"name": "measure", "params": {}}] * 3},
        "n_steps": 3,
    }


def check_begin_step(store: JobStore) -> None:
    assert store.create(_job("g1"))
    first = store.begin_step("g1", 0)
    assert first is not None
    assert (first.status, first.step_index, first.attempts) == ("INPROGRESS", 0, 1)
    # A redelivered step 0 counts a second attempt; the spec comes back with the record.
    again = store.begin_step("g1", 0)
    assert again is not None and again.attempts == 2
    assert again.spec == _job("g1")["spec"]
    assert again.updated_at >= first.updated_at
    later = store.begin_step("g1", 2)
    assert later is not None and (later.step_index, later.attempts) == (2, 3)
    # An older step after a later one began is refused and leaves the record alone.
    assert store.begin_step("g1", 1) is None
    assert store.get("g1") == later
    # A terminal job starts no step; an absent one neither.
    store.update("g1", status=JobStatus.STOPPED, reason="stopped by the user")
    assert store.begin_step("g1", 2) is None
    assert store.get("g1").status == "STOPPED"  # type: ignore[union-attr]
    assert store.begin_step("absent", 0) is None
    assert store.get("absent") is None


def check_begin_step_with_owner(store: JobStore) -> None:
    assert store.create(_job("o1"))
    first = store.begin_step("o1", 0, owner="task-a")
    assert first is not None and first.owner == "task-a"
    # Another owner may not begin the step task-a began (a duplicate message); task-a may
    # (its own message delivered again), and the next step is open to whoever hands it on.
    assert store.begin_step("o1", 0, owner="task-b") is None
    assert store.get("o1") == first
    again = store.begin_step("o1", 0, owner="task-a")
    assert again is not None and again.attempts == 2
    handed = store.begin_step("o1", 1, owner="task-b")
    assert handed is not None and (handed.owner, handed.step_index) == ("task-b", 1)
    assert store.begin_step("o1", 1, owner="task-a") is None
    assert store.begin_step("o1", 0, owner="task-b") is None  # never backwards
    # Without an owner the old rule holds: the same or a later step may begin.
    plain = store.begin_step("o1", 1)
    assert plain is not None and plain.attempts == 4 and plain.owner == "task-b"
    # A job nobody owns yet (step 0 not begun with an owner) is open to the first owner.
    assert store.create(_job("o2"))
    assert store.begin_step("o2", 0) is not None
    assert store.begin_step("o2", 0, owner="task-c") is not None
    store.update("o1", status=JobStatus.STOPPED, reason="stopped by the user")
    assert store.begin_step("o1", 1, owner="task-b") is None


def check_update_unless(store: JobStore) -> None:
    assert store.create(_job("g2"))
    done = store.update_unless("g2", {JobStatus.STOPPED}, status="COMPLETED", reason=None)
    assert done is not None and done.status == "COMPLETED"
    assert store.create(_job("g3"))
    store.update("g3", status=JobStatus.STOPPED, reason="stopped by the user")
    assert store.update_unless("g3", {JobStatus.STOPPED}, status="COMPLETED") is None
    kept = store.get("g3")
    assert kept is not None
    assert (kept.status, kept.reason) == ("STOPPED", "stopped by the user")
    with pytest.raises(NotFoundError, match="absent"):
        store.update_unless("absent", {JobStatus.STOPPED}, status="FAILED")
