"""benchmarks/service_overhead.py splits a run's time by its step records' timestamps."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from benchmarks.service_overhead import phases


def stamp(seconds: float) -> str:
    return datetime.fromtimestamp(1_800_000_000 + seconds, UTC).isoformat()


def test_phases_add_up_to_the_run() -> None:
    # step 0: body 0.50 s from t=0.10, saved by t=0.65; step 1: body from t=0.70 to 0.90,
    # saved by t=0.93; the job ended at t=1.00.
    records = [
        {"index": 1, "started_at": stamp(0.70), "finished_at": stamp(0.93), "duration_s": 0.20},
        {"index": 0, "started_at": stamp(0.10), "finished_at": stamp(0.65), "duration_s": 0.50},
    ]
    parts = phases(records, start=1_800_000_000.0, end=1_800_000_001.0)
    assert parts["before the first step"] == pytest.approx(100, abs=0.01)
    assert parts["between steps (sum)"] == pytest.approx(50, abs=0.01)
    assert parts["saving outputs (sum)"] == pytest.approx(50 + 30, abs=0.01)
    assert parts["after the last step"] == pytest.approx(70, abs=0.01)
    assert parts["step bodies (sum)"] == pytest.approx(700, abs=0.01)
    assert sum(parts.values()) == pytest.approx(1000, abs=0.01)
