"""Step records: one per (job_id, index), written once, in DynamoDB and/or SQLite (+ CSV export)."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from modules.core.records import StepRecord
from modules.errors import BadInputError
from modules.storage.artifacts import ArtifactStore
from modules.storage.dynamo import DynamoTable
from modules.storage.keys import record_overflow_key, validate_user_id
from modules.storage.ttl import ttl_attribute

MAX_INDEX = 9999  # the sort key is f"{index:04d}"; a fifth digit would break its ordering
# Bytes of record JSON kept inline; DynamoDB caps a whole item at 400 KB.
DYNAMO_INLINE_LIMIT = 350_000

CSV_COLUMNS = [
    "job_id",
    "index",
    "step",
    "user_id",
    "profile",
    "status",
    "passed",
    "input_key",
    "output_key",
    "input_size",
    "output_size",
    "accuracy",
    "latency_b1_ms",
    "started_at",
    "finished_at",
    "duration_s",
    "record_json",
]


@runtime_checkable
class StepLog(Protocol):
    """Append-once log of step records keyed by (job_id, index)."""

    def append(self, record: StepRecord) -> bool:
        """Write `record`; False (and no change) if (job_id, index) already has one."""
        ...

    def get(self, job_id: str, index: int) -> StepRecord | None:
        """Return the record for (job_id, index), or None."""
        ...

    def records(self, job_id: str) -> list[StepRecord]:
        """Return the job's records ordered by index."""
        ...


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def check_record(typed: StepRecord) -> tuple[dict[str, Any], str]:
    """Validate a record's identity fields; return it as a dict and as its JSON text."""
    if not isinstance(typed, StepRecord):
        raise BadInputError(f"a step record must be a StepRecord, not {type(typed).__name__}")
    record = typed.model_dump()
    job_id, index, step = record.get("job_id"), record.get("index"), record.get("step")
    if not isinstance(job_id, str) or not job_id:
        raise BadInputError(f"step record needs a non-empty str job_id, got {job_id!r}")
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index <= MAX_INDEX:
        raise BadInputError(f"step record needs an int index in 0..{MAX_INDEX}, got {index!r}")
    if not isinstance(step, str) or not step:
        raise BadInputError(f"step record needs a non-empty str step, got {step!r}")
    try:
        return record, json.dumps(record, sort_keys=True, allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise BadInputError(f"step record {job_id}/{index} is not JSON-able: {exc}") from exc


def _lookup(record: dict[str, Any], name: str) -> Any:
    """Find `name` at the top level of a record, then under `metrics`."""
    if name in record:
        return record[name]
    metrics = record.get("metrics")
    if isinstance(metrics, dict):
        return metrics.get(name)
    return None


def _scalar(value: Any, *stat_names: str) -> Any:
    """Reduce a stat dict ({"mean": ..., "median": ...}) to its first present stat."""
    if isinstance(value, dict):
        for stat in stat_names:
            if stat in value:
                return value[stat]
        return None
    return value


def _passed(record: StepRecord) -> bool | None:
    """The CSV's passed cell: the gate's outcome, blank for a step without a verdict."""
    return None if record.verdict is None else not record.rejected


def _parse(record_json: str | bytes) -> StepRecord:
    return StepRecord.model_validate(json.loads(record_json))


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    return str(value)


def csv_row(typed: StepRecord, record_json: str) -> dict[str, str]:
    """Flatten a record to the CSV's fixed columns, keeping the full record in record_json."""
    record = typed.model_dump()
    flat: dict[str, Any] = {name: _lookup(record, name) for name in CSV_COLUMNS}
    flat["passed"] = _passed(typed)
    flat["accuracy"] = _scalar(flat["accuracy"], "mean")
    if flat["latency_b1_ms"] is None:
        # The measure step nests its latencies by batch size: metrics.latency_ms.b1.
        latency = (record.get("metrics") or {}).get("latency_ms")
        flat["latency_b1_ms"] = latency.get("b1") if isinstance(latency, dict) else None
    flat["latency_b1_ms"] = _scalar(flat["latency_b1_ms"], "median", "mean")
    flat["record_json"] = record_json
    return {name: _cell(flat[name]) for name in CSV_COLUMNS}


class SqliteStepLog:
    """Step records in one SQLite file, with an optional CSV export written beside them.

    SQLite is the record of truth: (job_id, index) is the primary key, so a second append of
    the same step is a no-op, and its write lock orders writers across processes. The CSV is
    an export for people and spreadsheets, one flattened row per record plus the full record
    as JSON. Its row is written inside the same transaction as the insert, and the file's
    size after each committed append is kept in the database; a CSV that does not have that
    size (a writer died between writing the row and committing, or someone edited the file)
    is rewritten from the database before the next row goes on, never patched in place.
    """

    def __init__(self, path: Path, *, csv_export: Path | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.csv_export = None if csv_export is None else Path(csv_export)
        with self._connect() as conn:
            self._use_wal(conn)
            conn.execute(
                "CREATE TABLE IF NOT EXISTS steps (job_id TEXT NOT NULL, idx INTEGER NOT NULL,"
                " record_json TEXT NOT NULL, PRIMARY KEY (job_id, idx))"
            )
            conn.execute(
                "CREATE TABLE IF NOT EXISTS csv_export (path TEXT PRIMARY KEY, size INTEGER)"
            )
            if self.csv_export is not None:
                self._adopt_csv(conn, self.csv_export)

    @staticmethod
    def _use_wal(conn: sqlite3.Connection) -> None:
        """Switch the file to WAL once; processes opening it at the same moment may race."""
        for attempt in range(100):
            try:
                if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    conn.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                # Changing the journal mode does not wait on the busy timeout.
                if "locked" not in str(exc) or attempt == 99:
                    raise
                time.sleep(0.05)

    @staticmethod
    def _adopt_csv(conn: sqlite3.Connection, path: Path) -> None:
        """Take in the records of a CSV log this database has not seen (an older CSV-only log).

        Its rows go into the database; the next append then rewrites the CSV from it.
        """
        known = conn.execute("SELECT 1 FROM csv_export WHERE path = ?", (str(path),)).fetchone()
        if known is not None or not path.exists():
            return
        csv.field_size_limit(2**31 - 1)  # record_json cells can exceed the 128 KiB default
        with open(path, newline="", encoding="utf-8") as handle:
            try:
                for row in csv.DictReader(handle):
                    text = row.get("record_json")
                    try:
                        record = _parse(text or "")
                    except ValueError:
                        continue  # a torn or hand-edited row holds no record
                    conn.execute(
                        "INSERT OR IGNORE INTO steps (job_id, idx, record_json) VALUES (?, ?, ?)",
                        (record.job_id, record.index, text),
                    )
            except csv.Error:
                pass  # a torn last row: the rows before it are in

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # isolation_level=None: append issues BEGIN IMMEDIATE itself.
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            yield conn
        finally:
            conn.close()

    def append(self, record: StepRecord) -> bool:
        """Insert the record unless (job_id, index) has one; then add its CSV export row."""
        _, record_json = check_record(record)
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                inserted = conn.execute(
                    "INSERT OR IGNORE INTO steps (job_id, idx, record_json) VALUES (?, ?, ?)",
                    (record.job_id, record.index, record_json),
                ).rowcount
                if inserted and self.csv_export is not None:
                    self._export_row(conn, record, record_json)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        return bool(inserted)

    def _export_row(self, conn: sqlite3.Connection, record: StepRecord, record_json: str) -> None:
        """Append one CSV row (the export rewritten first if it is not as last committed)."""
        assert self.csv_export is not None
        path = self.csv_export
        row = conn.execute("SELECT size FROM csv_export WHERE path = ?", (str(path),)).fetchone()
        committed = None if row is None else row[0]
        size = path.stat().st_size if path.exists() else None
        if size != committed or (size is None and self._has_rows(conn, but=record)):
            self._rewrite_csv(conn, exclude=(record.job_id, record.index))
        with open(path, "a", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
            if handle.tell() == 0:
                writer.writeheader()
            writer.writerow(csv_row(record, record_json))
            handle.flush()
            os.fsync(handle.fileno())
        conn.execute(
            "INSERT OR REPLACE INTO csv_export (path, size) VALUES (?, ?)",
            (str(path), path.stat().st_size),
        )

    @staticmethod
    def _has_rows(conn: sqlite3.Connection, *, but: StepRecord) -> bool:
        found = conn.execute(
            "SELECT 1 FROM steps WHERE NOT (job_id = ? AND idx = ?) LIMIT 1",
            (but.job_id, but.index),
        ).fetchone()
        return found is not None

    def _rewrite_csv(self, conn: sqlite3.Connection, *, exclude: tuple[str, int]) -> None:
        """Write the whole export from the database to a temp file and swap it in."""
        assert self.csv_export is not None
        path = self.csv_export
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(temp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            rows = conn.execute("SELECT job_id, idx, record_json FROM steps ORDER BY rowid")
            for job_id, index, record_json in rows:
                if (job_id, index) != exclude:
                    writer.writerow(csv_row(_parse(record_json), record_json))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)

    def get(self, job_id: str, index: int) -> StepRecord | None:
        """Return the record for (job_id, index), or None."""
        with self._connect() as conn:
            row = conn.execute(
                "SELECT record_json FROM steps WHERE job_id = ? AND idx = ?", (job_id, int(index))
            ).fetchone()
        return None if row is None else _parse(row[0])

    def records(self, job_id: str) -> list[StepRecord]:
        """Return the job's records ordered by index."""
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT record_json FROM steps WHERE job_id = ? ORDER BY idx", (job_id,)
            ).fetchall()
        return [_parse(text) for (text,) in rows]


def _number(value: Any) -> str | None:
    """DynamoDB N text for an int/float, or None for anything else (bools, NaN, inf)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = Decimal(str(value))
    return str(number) if number.is_finite() else None


class DynamoStepLog(DynamoTable):
    """Step records in DynamoDB: PK job_id, SK zero-padded index; big ones overflow to a store."""

    def __init__(
        self,
        table_name: str,
        *,
        client: Any = None,
        overflow_store: ArtifactStore | None = None,
        region: str = "us-east-1",
        ttl_days: int = 0,
    ) -> None:
        super().__init__(table_name, client=client, region=region, ttl_days=ttl_days)
        self.overflow_store = overflow_store

    @staticmethod
    def sort_key(index: int) -> str:
        """Return the zero-padded sort key for a step index."""
        return f"{index:04d}"

    @staticmethod
    def overflow_key(*, user_id: str, job_id: str, index: int) -> str:
        """Return the store key that holds an oversized record's JSON."""
        return record_overflow_key(user_id=user_id, job_id=job_id, index=index)

    def ensure_table(self) -> None:
        """Create the table (PAY_PER_REQUEST) if it does not exist."""
        self._create_table(
            AttributeDefinitions=[
                {"AttributeName": "job_id", "AttributeType": "S"},
                {"AttributeName": "step", "AttributeType": "S"},
            ],
            KeySchema=[
                {"AttributeName": "job_id", "KeyType": "HASH"},
                {"AttributeName": "step", "KeyType": "RANGE"},
            ],
        )

    def _item_key(self, job_id: str, index: int) -> dict[str, Any]:
        return {"job_id": {"S": job_id}, "step": {"S": self.sort_key(index)}}

    def append(self, typed: StepRecord) -> bool:
        """Conditionally put the record; False if (job_id, index) already exists."""

        record, record_json = check_record(typed)
        job_id, index = typed.job_id, typed.index
        item: dict[str, Any] = {
            **self._item_key(job_id, index),
            "index": {"N": str(index)},
            "step_name": {"S": typed.step},
            "created_at": {"S": _now()},
            **ttl_attribute(self.ttl_days),
        }
        for name in ("user_id", "profile"):
            if isinstance(record.get(name), str) and record[name]:
                item[name] = {"S": record[name]}
        output_size = _number(record.get("output_size"))
        if output_size is not None:
            item["output_size"] = {"N": output_size}

        encoded = record_json.encode("utf-8")
        if len(encoded) <= DYNAMO_INLINE_LIMIT:
            item["record_json"] = {"S": record_json}
        else:
            if self.get(job_id, index) is not None:
                # Checked first so a duplicate never overwrites the stored overflow JSON.
                return False
            item["record_ref"] = {"S": self._put_overflow(record, encoded)}
        return self._put_new(item)

    def _put_overflow(self, record: dict[str, Any], encoded: bytes) -> str:
        job_id, index = record["job_id"], record["index"]
        if self.overflow_store is None:
            raise BadInputError(
                f"step record {job_id}/{index} is too big for DynamoDB "
                f"({len(encoded)} bytes > {DYNAMO_INLINE_LIMIT}) and no overflow store is set"
            )
        user_id = record.get("user_id")
        if not isinstance(user_id, str):
            raise BadInputError(f"oversized step record {job_id}/{index} needs a user_id")
        key = self.overflow_key(user_id=validate_user_id(user_id), job_id=job_id, index=index)
        self.overflow_store.put_bytes(key, encoded)
        return key

    def _decode(self, item: dict[str, Any]) -> StepRecord:
        if "record_json" in item:
            text: str | bytes = item["record_json"]["S"]
        else:
            if self.overflow_store is None:
                ref = item["record_ref"]["S"]
                raise BadInputError(f"step record is at {ref!r} but no overflow store is set")
            text = self.overflow_store.get_bytes(item["record_ref"]["S"])
        return _parse(text)

    def get(self, job_id: str, index: int) -> StepRecord | None:
        """Return the record for (job_id, index), reading overflow transparently, or None."""
        response = self.client.get_item(
            TableName=self.table_name, Key=self._item_key(job_id, index), ConsistentRead=True
        )
        item = response.get("Item")
        return None if item is None else self._decode(item)

    def records(self, job_id: str) -> list[StepRecord]:
        """Return the job's records ordered by index (Query, following LastEvaluatedKey)."""
        items: list[dict[str, Any]] = []
        kwargs: dict[str, Any] = {
            "TableName": self.table_name,
            "KeyConditionExpression": "#pk = :job",
            "ExpressionAttributeNames": {"#pk": "job_id"},
            "ExpressionAttributeValues": {":job": {"S": job_id}},
            "ConsistentRead": True,
        }
        while True:
            response = self.client.query(**kwargs)
            items.extend(response.get("Items", []))
            last = response.get("LastEvaluatedKey")
            if not last:
                break
            kwargs["ExclusiveStartKey"] = last
        return [self._decode(item) for item in items]


class TeeStepLog:
    """Writes every record to all logs; reads from the primary."""

    def __init__(self, primary: StepLog, *others: StepLog) -> None:
        self.primary = primary
        self.others = others

    def append(self, record: StepRecord) -> bool:
        """Append to every log (a retry fills any that missed it); return the primary's answer."""
        written = self.primary.append(record)
        for other in self.others:
            other.append(record)
        return written

    def get(self, job_id: str, index: int) -> StepRecord | None:
        """Return the primary's record."""
        return self.primary.get(job_id, index)

    def records(self, job_id: str) -> list[StepRecord]:
        """Return the primary's records."""
        return self.primary.records(job_id)
