"""SqliteStepLog: append-once records that read back as written, and their CSV export."""

from __future__ import annotations

import csv
import multiprocessing
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from modules.core.records import StepRecord
from modules.errors import BadInputError
from modules.storage.steplog import CSV_COLUMNS, SqliteStepLog, StepLog, TeeStepLog


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
def log(tmp_path: Path) -> SqliteStepLog:
    return SqliteStepLog(
        tmp_path / "logs" / "steps.sqlite", csv_export=tmp_path / "logs" / "steps.csv"
    )


def export_rows(log: SqliteStepLog) -> list[dict[str, str]]:
    assert log.csv_export is not None
    csv.field_size_limit(2**31 - 1)  # record_json cells can exceed the 128 KiB default
    with open(log.csv_export, newline="") as handle:
        return list(csv.DictReader(handle))


def test_round_trip_returns_the_same_dict(log: SqliteStepLog) -> None:
    record = make_record()
    assert log.append(record) is True
    assert log.get("job1", 0) == record
    assert log.records("job1") == [record]
    assert isinstance(log, StepLog)


def test_second_append_is_a_no_op(log: SqliteStepLog) -> None:
    first = make_record()
    assert log.append(first)
    assert log.append(make_record(status="different")) is False
    assert log.get("job1", 0) == first
    assert len(export_rows(log)) == 1


def test_header_once_and_flattened_columns(log: SqliteStepLog) -> None:
    log.append(make_record(index=0))
    log.append(make_record(index=1, verdict={"passed": False}, metrics={"accuracy": 0.5}))
    assert log.csv_export is not None
    with open(log.csv_export, newline="") as handle:
        header = next(csv.reader(handle))
    rows = export_rows(log)
    assert header == CSV_COLUMNS
    assert [r["index"] for r in rows] == ["0", "1"]
    assert rows[0]["accuracy"] == "0.97"
    assert rows[0]["latency_b1_ms"] == "0.25"
    assert rows[0]["passed"] == "True"
    assert rows[0]["output_size"] == "1200000"
    assert rows[1]["accuracy"] == "0.5"
    assert rows[1]["latency_b1_ms"] == ""
    assert rows[1]["passed"] == "False"
    assert StepRecord.model_validate_json(rows[0]["record_json"]) == make_record(index=0)


def test_records_are_ordered_by_index_and_scoped_to_job(log: SqliteStepLog) -> None:
    for index in (10, 2, 0):
        log.append(make_record(index=index))
    log.append(make_record(job_id="other", index=1))
    assert [r.index for r in log.records("job1")] == [0, 2, 10]
    assert [r.index for r in log.records("other")] == [1]
    assert log.records("missing") == []
    assert log.get("job1", 3) is None


def test_reads_before_any_write(tmp_path: Path) -> None:
    log = SqliteStepLog(tmp_path / "empty.sqlite")
    assert log.get("job1", 0) is None
    assert log.records("job1") == []


def test_without_an_export_no_csv_is_written(tmp_path: Path) -> None:
    log = SqliteStepLog(tmp_path / "steps.sqlite")
    assert log.append(make_record())
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".csv"] == []


def test_large_record_json_round_trips(log: SqliteStepLog) -> None:
    record = make_record(series=[float(i) / 3 for i in range(30_000)])
    assert log.append(record)
    assert SqliteStepLog(log.path).get("job1", 0) == record
    assert StepRecord.model_validate_json(export_rows(log)[0]["record_json"]) == record


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
def test_invalid_records_are_rejected(log: SqliteStepLog, bad: dict[str, Any]) -> None:
    with pytest.raises((BadInputError, ValidationError)):
        log.append(StepRecord.model_validate(bad))
    assert log.csv_export is not None and not log.csv_export.exists()


def test_a_dict_is_not_a_record(log: SqliteStepLog) -> None:
    with pytest.raises(BadInputError, match="StepRecord"):
        log.append(make_record().model_dump())  # type: ignore[arg-type]
    assert log.csv_export is not None and not log.csv_export.exists()


def _append_from_process(db: str, export: str, index: int) -> bool:
    return SqliteStepLog(Path(db), csv_export=Path(export)).append(
        make_record(index=index, who=index)
    )


def test_concurrent_processes_write_each_pair_once(tmp_path: Path) -> None:
    db, export = tmp_path / "shared.sqlite", tmp_path / "shared.csv"
    args = [(str(db), str(export), i % 3) for i in range(12)]
    with multiprocessing.get_context("fork").Pool(4) as pool:
        results = pool.starmap(_append_from_process, args)
    assert sum(results) == 3
    log = SqliteStepLog(db, csv_export=export)
    assert [r.index for r in log.records("job1")] == [0, 1, 2]
    assert sorted(r["index"] for r in export_rows(log)) == ["0", "1", "2"]


def test_tee_writes_everywhere_and_reads_primary(tmp_path: Path) -> None:
    primary = SqliteStepLog(tmp_path / "a.sqlite")
    secondary = SqliteStepLog(tmp_path / "b.sqlite", csv_export=tmp_path / "b.csv")
    record = make_record()
    secondary.append(record)  # a retry after the secondary got the record but not the primary
    tee = TeeStepLog(primary, secondary)
    assert tee.append(record) is True
    assert tee.append(record) is False
    assert primary.records("job1") == [record]
    assert secondary.records("job1") == [record]
    assert len(export_rows(secondary)) == 1  # the retries added no second export row
    assert tee.get("job1", 0) == record
    assert tee.records("job1") == [record]


def test_measure_latency_fills_the_latency_column(log: SqliteStepLog) -> None:
    stat = {"mean": 2.0, "median": 1.5, "ci95": [1.0, 3.0], "n": 30}
    log.append(
        StepRecord(
            job_id="j",
            index=0,
            step="measure",
            metrics={"latency_ms": {"b1": stat, "b64": {**stat, "median": 9.0}}},
        )
    )
    assert float(export_rows(log)[0]["latency_b1_ms"]) == 1.5


def test_another_instance_sees_new_rows_and_cannot_duplicate_them(log: SqliteStepLog) -> None:
    second = SqliteStepLog(log.path, csv_export=log.csv_export)
    assert log.append(make_record("job1", 0))
    assert second.get("job1", 0) == make_record("job1", 0)
    assert second.append(make_record("job1", 1))
    assert log.append(make_record("job1", 1)) is False
    assert [r.index for r in log.records("job1")] == [0, 1]
    assert len(export_rows(log)) == 2


def test_cells_with_newlines_and_unicode_keep_rows_apart(log: SqliteStepLog) -> None:
    odd = make_record("job1", 0, step='multi\nline, "quoted"', note="naïve ✓\r\nsecond line")
    assert log.append(odd)
    assert log.append(make_record("job1", 1))
    assert log.get("job1", 0) == odd
    assert SqliteStepLog(log.path).records("job1") == [odd, make_record("job1", 1)]
    rows = export_rows(log)
    assert [StepRecord.model_validate_json(r["record_json"]) for r in rows] == [
        odd,
        make_record("job1", 1),
    ]


def test_a_torn_export_row_is_rewritten_from_the_records(log: SqliteStepLog) -> None:
    assert log.append(make_record("job1", 0))
    assert log.csv_export is not None
    with log.csv_export.open("ab") as handle:  # a writer that died in the middle of its row
        handle.write(b'job1,1,prune_structured,alice,mcu-8mb,ok,"{""unterminated')
    assert log.get("job1", 1) is None  # reads never look at the export
    assert log.append(make_record("job1", 1))
    rows = export_rows(log)
    assert [(r["job_id"], r["index"]) for r in rows] == [("job1", "0"), ("job1", "1")]


def test_a_deleted_export_is_written_again_whole(log: SqliteStepLog) -> None:
    assert log.append(make_record("job1", 0))
    assert log.append(make_record("job1", 1))
    assert log.csv_export is not None
    log.csv_export.unlink()
    assert [r.index for r in log.records("job1")] == [0, 1]  # the records are not the export
    assert log.append(make_record("job2", 0))
    assert [(r["job_id"], r["index"]) for r in export_rows(log)] == [
        ("job1", "0"),
        ("job1", "1"),
        ("job2", "0"),
    ]


def test_a_row_exported_but_never_committed_is_not_kept_twice(
    log: SqliteStepLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert log.append(make_record("job1", 0))
    real_replace = SqliteStepLog._export_row

    def die_after_writing(self: SqliteStepLog, *args: Any) -> None:
        real_replace(self, *args)
        raise OSError("the process died before COMMIT")

    monkeypatch.setattr(SqliteStepLog, "_export_row", die_after_writing)
    with pytest.raises(OSError):
        log.append(make_record("job1", 1))
    monkeypatch.undo()
    assert log.get("job1", 1) is None  # the insert was rolled back
    assert log.append(make_record("job1", 1))  # the retry
    assert [r["index"] for r in export_rows(log)] == ["0", "1"]


def test_an_older_csv_only_log_is_taken_in(tmp_path: Path) -> None:
    export = tmp_path / "steps.csv"
    old = SqliteStepLog(tmp_path / "scratch.sqlite", csv_export=export)
    old.append(make_record("job1", 0))
    old.append(make_record("job1", 1))
    with export.open("ab") as handle:  # and a torn last row from its writer
        handle.write(b'job1,2,prune_structured,alice,"{""unterminated')
    adopted = SqliteStepLog(tmp_path / "steps.sqlite", csv_export=export)
    assert [r.index for r in adopted.records("job1")] == [0, 1]
    assert adopted.append(make_record("job1", 2))
    assert [r["index"] for r in export_rows(adopted)] == ["0", "1", "2"]
