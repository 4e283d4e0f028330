"""CsvStepLog: append-once rows that read back as the record that was written."""

from __future__ import annotations

import csv
import multiprocessing
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from modules.core.records import StepRecord
from modules.errors import BadInputError
from modules.storage.steplog import CSV_COLUMNS, CsvStepLog, StepLog, TeeStepLog


def make_record(job_id: str = "job1", index: int = 0, **extra: Any) -> StepRecord:
    record: dict[str, Any] = {
        "job_id": job_id,
        "index": index,
        "step": "prune_structured",
        "user_id": "alice",
        "profile": "mcu-8mb",
        "status": "ok",
        "verdict": {"passed": True, "reason": None},
        "input_key": "users/alice/models/m1/model.pt",
        "output_key": f"users/alice/mcu-8mb/{job_id}/{index}-prune_structured/model.pt",
        "input_size": 4_500_000,
        "output_size": 1_200_000,
        "metrics": {
            "accuracy": {"mean": 0.97, "std": 0.01, "ci95": [0.95, 0.99], "n": 5},
            "latency_b1_ms": {"median": 0.25, "mean": 0.27, "std": 0.02, "n": 50},
            "series": [1.5, 2.25, None],
        },
        "params": {"ratio": 0.5},
        "started_at": "2024-01-01T00:00:00+00:00",
        "finished_at": "2024-01-01T00:00:01.5+00:00",
        "duration_s": 1.5,
    }
    record.update(extra)
    return StepRecord.model_validate(record)


@pytest.fixture
def log(tmp_path: Path) -> CsvStepLog:
    return CsvStepLog(tmp_path / "logs" / "steps.csv")


def test_round_trip_returns_the_same_dict(log: CsvStepLog) -> None:
    record = make_record()
    assert log.append(record) is True
    assert log.get("job1", 0) == record
    assert log.records("job1") == [record]
    assert isinstance(log, StepLog)


def test_second_append_is_a_no_op(log: CsvStepLog) -> None:
    first = make_record()
    assert log.append(first)
    assert log.append(make_record(status="different")) is False
    assert log.get("job1", 0) == first
    with open(log.path, newline="") as handle:
        rows = list(csv.reader(handle))
    assert len(rows) == 2  # header + one record


def test_header_once_and_flattened_columns(log: CsvStepLog) -> None:
    log.append(make_record(index=0))
    log.append(make_record(index=1, verdict={"passed": False}, metrics={"accuracy": 0.5}))
    with open(log.path, newline="") as handle:
        header = next(csv.reader(handle))
        handle.seek(0)
        rows = list(csv.DictReader(handle))
    assert header == CSV_COLUMNS
    assert [r["index"] for r in rows] == ["0", "1"]
    assert rows[0]["accuracy"] == "0.97"
    assert rows[0]["latency_b1_ms"] == "0.25"
    assert rows[0]["passed"] == "True"
    assert rows[0]["output_size"] == "1200000"
    assert rows[1]["accuracy"] == "0.5"
    assert rows[1]["latency_b1_ms"] == ""
    assert rows[1]["passed"] == "False"


def test_records_are_ordered_by_index_and_scoped_to_job(log: CsvStepLog) -> None:
    for index in (10, 2, 0):
        log.append(make_record(index=index))
    log.append(make_record(job_id="other", index=1))
    assert [r.index for r in log.records("job1")] == [0, 2, 10]
    assert [r.index for r in log.records("other")] == [1]
    assert log.records("missing") == []
    assert log.get("job1", 3) is None


def test_reads_before_any_write(tmp_path: Path) -> None:
    log = CsvStepLog(tmp_path / "empty.csv")
    assert log.get("job1", 0) is None
    assert log.records("job1") == []


def test_large_record_json_round_trips(log: CsvStepLog) -> None:
    record = make_record(series=[float(i) / 3 for i in range(30_000)])
    assert log.append(record)
    assert CsvStepLog(log.path).get("job1", 0) == record


@pytest.mark.parametrize(
    "bad",
    [
        {"index": 0, "step": "s"},
        {"job_id": "j", "index": "0", "step": "s"},
        {"job_id": "j", "index": True, "step": "s"},
        {"job_id": "j", "index": -1, "step": "s"},
        {"job_id": "j", "index": 0},
        {"job_id": "j", "index": 0, "step": "s", "obj": object()},
    ],
)
def test_invalid_records_are_rejected(log: CsvStepLog, bad: dict[str, Any]) -> None:
    with pytest.raises((BadInputError, ValidationError)):
        log.append(StepRecord.model_validate(bad))
    assert not log.path.exists()


def test_a_dict_is_not_a_record(log: CsvStepLog) -> None:
    with pytest.raises(BadInputError, match="StepRecord"):
        log.append(make_record().model_dump())  # type: ignore[arg-type]
    assert not log.path.exists()


def _append_from_process(path: str, index: int) -> bool:
    return CsvStepLog(Path(path)).append(make_record(index=index, who=index))


def test_concurrent_processes_write_each_pair_once(tmp_path: Path) -> None:
    path = tmp_path / "shared.csv"
    args = [(str(path), i % 3) for i in range(12)]
    with multiprocessing.get_context("fork").Pool(4) as pool:
        results = pool.starmap(_append_from_process, args)
    assert sum(results) == 3
    log = CsvStepLog(path)
    assert [r.index for r in log.records("job1")] == [0, 1, 2]
    with open(path, newline="") as handle:
        assert len(list(csv.reader(handle))) == 4


def test_tee_writes_everywhere_and_reads_primary(tmp_path: Path) -> None:
    primary = CsvStepLog(tmp_path / "a.csv")
    secondary = CsvStepLog(tmp_path / "b.csv")
    record = make_record()
    secondary.append(record)  # a retry after the secondary got the record but not the primary
    tee = TeeStepLog(primary, secondary)
    assert tee.append(record) is True
    assert tee.append(record) is False
    assert primary.records("job1") == [record]
    assert secondary.records("job1") == [record]
    assert tee.get("job1", 0) == record
    assert tee.records("job1") == [record]


def test_measure_latency_fills_the_latency_column(tmp_path):
    import csv

    from modules.storage.steplog import CsvStepLog

    log = CsvStepLog(tmp_path / "steps.csv")
    stat = {"mean": 2.0, "median": 1.5, "ci95": [1.0, 3.0], "n": 30}
    log.append(
        StepRecord(
            job_id="j",
            index=0,
            step="measure",
            metrics={"latency_ms": {"b1": stat, "b64": {**stat, "median": 9.0}}},
        )
    )
    with open(tmp_path / "steps.csv", newline="") as fh:
        row = next(csv.DictReader(fh))
    assert float(row["latency_b1_ms"]) == 1.5


def test_another_instance_sees_new_rows_and_cannot_duplicate_them(tmp_path: Path) -> None:
    path = tmp_path / "steps.csv"
    first, second = CsvStepLog(path), CsvStepLog(path)
    assert first.append(make_record("job1", 0))
    assert second.get("job1", 0) == make_record("job1", 0)  # second indexes what first wrote
    assert second.append(make_record("job1", 1))
    # first only reads the bytes appended since it last looked, and sees second's row.
    assert first.append(make_record("job1", 1)) is False
    assert [r.index for r in first.records("job1")] == [0, 1]
    assert len(list(csv.DictReader(path.open(newline="")))) == 2


def test_cells_with_newlines_and_unicode_keep_rows_apart(log: CsvStepLog) -> None:
    odd = make_record("job1", 0, step='multi\nline, "quoted"', note="naïve ✓\r\nsecond line")
    assert log.append(odd)
    assert log.append(make_record("job1", 1))
    assert log.get("job1", 0) == odd
    assert log.records("job1") == [odd, make_record("job1", 1)]
    assert CsvStepLog(log.path).records("job1") == [odd, make_record("job1", 1)]


def test_a_torn_last_row_is_not_a_record_and_is_cut_before_the_next_append(
    log: CsvStepLog,
) -> None:
    assert log.append(make_record("job1", 0))
    whole = log.path.read_bytes()
    with log.path.open("ab") as handle:  # a writer that died in the middle of its row
        handle.write(b'job1,1,prune_structured,alice,mcu-8mb,ok,"{""unterminated')
    fresh = CsvStepLog(log.path)
    assert fresh.get("job1", 1) is None
    assert [r.index for r in fresh.records("job1")] == [0]
    assert fresh.append(make_record("job1", 1))
    assert log.path.read_bytes().startswith(whole)
    rows = list(csv.DictReader(log.path.open(newline="")))
    assert [(r["job_id"], r["index"]) for r in rows] == [("job1", "0"), ("job1", "1")]
    assert log.records("job1") == [make_record("job1", 0), make_record("job1", 1)]


def test_a_replaced_or_truncated_file_is_indexed_again(log: CsvStepLog) -> None:
    assert log.append(make_record("job1", 0))
    assert log.append(make_record("job1", 1))
    log.path.unlink()
    assert log.get("job1", 0) is None
    assert log.append(make_record("job2", 0))
    assert log.records("job1") == []
    assert [r.job_id for r in log.records("job2")] == ["job2"]


def test_append_reads_only_what_was_appended_since(
    log: CsvStepLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    for index in range(50):
        assert log.append(make_record("job1", index))
    size = log.path.stat().st_size
    read_sizes: list[int] = []
    real_open = open

    class Spy:
        def __init__(self, handle: Any) -> None:
            self.handle = handle

        def __enter__(self) -> Spy:
            self.handle.__enter__()
            return self

        def __exit__(self, *exc: Any) -> None:
            self.handle.__exit__(*exc)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.handle, name)

        def read(self, n: int = -1) -> bytes:
            data = self.handle.read(n)
            read_sizes.append(len(data))
            return bytes(data)

    def spying_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = real_open(file, mode, *args, **kwargs)
        return Spy(handle) if Path(file) == log.path and "b" in mode else handle

    monkeypatch.setattr("builtins.open", spying_open)
    assert log.append(make_record("job1", 50))
    assert log.get("job1", 3) == make_record("job1", 3)
    # The new row and the one record asked for, never the whole file again.
    assert read_sizes and max(read_sizes) < size / 10, (read_sizes, size)
