"""Step records: one per (job_id, index), written once, in DynamoDB and/or a CSV file."""

from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import os
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


class CsvStepLog:
    """Step records as rows of one CSV file; safe across processes through an fcntl lock.

    Each instance keeps an index of where every (job_id, index) row starts and ends in the
    file, and brings it up to date by reading only the bytes appended since it last looked
    (another process may have appended). So append, get and records cost the new rows plus
    the rows they return, not a scan of the whole file. A file that shrank or was replaced
    is indexed again from the start.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        # record_json cells can exceed csv's default 128 KiB field limit.
        csv.field_size_limit(2**31 - 1)
        self._rows_at: dict[tuple[str, int], tuple[int, int]] = {}  # -> (offset, length)
        self._by_job: dict[str, set[int]] = {}
        self._header: list[str] | None = None
        self._indexed = 0  # bytes of the file indexed so far (always a row boundary)
        self._inode: int | None = None

    @contextlib.contextmanager
    def _locked(self, mode: int) -> Iterator[None]:
        with open(self.lock_path, "a+b") as lock:
            fcntl.flock(lock.fileno(), mode)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _forget(self) -> None:
        self._rows_at.clear()
        self._by_job.clear()
        self._header = None
        self._indexed = 0

    def _catch_up(self) -> None:
        """Index the rows appended since the last call; call with the lock held."""
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            self._forget()
            self._inode = None
            return
        if stat.st_ino != self._inode or stat.st_size < self._indexed:
            self._forget()
            self._inode = stat.st_ino
        if stat.st_size == self._indexed:
            return
        with open(self.path, "rb") as handle:
            handle.seek(self._indexed)
            tail = handle.read(stat.st_size - self._indexed)
        position = self._indexed

        def lines() -> Iterator[str]:
            # The csv reader pulls exactly the lines of one row per step, so `position`
            # after each row is where that row ends (quoted cells may span lines).
            nonlocal position
            for line in tail.splitlines(keepends=True):
                position += len(line)
                yield line.decode("utf-8")

        base = row_start = position
        reader = csv.reader(lines())
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error:
                break  # a torn last row (a writer died inside a quoted cell)
            if tail[position - base - 1 : position - base] not in (b"\n", b"\r"):
                break  # a torn last row (a writer died mid-row): not a record
            if self._header is None:
                self._header = row
            elif row:
                fields = dict(zip(self._header, row, strict=False))
                key = (fields["job_id"], int(fields["index"]))
                self._rows_at.setdefault(key, (row_start, position - row_start))
                self._by_job.setdefault(key[0], set()).add(key[1])
            self._indexed = row_start = position

    def _read_record(self, offset: int, length: int) -> StepRecord:
        with open(self.path, "rb") as handle:
            handle.seek(offset)
            raw = handle.read(length).decode("utf-8")
        assert self._header is not None  # a row was indexed, so the header was read
        row = next(csv.reader(raw.splitlines(keepends=True)))
        return _parse(row[self._header.index("record_json")])

    def append(self, record: StepRecord) -> bool:
        """Append one row unless (job_id, index) is already present; flush and fsync."""
        _, record_json = check_record(record)
        key = (record.job_id, record.index)
        with self._locked(fcntl.LOCK_EX):
            self._catch_up()
            if key in self._rows_at:
                return False
            if self.path.exists() and os.path.getsize(self.path) > self._indexed:
                # Bytes past the last whole row are a row a writer died writing (it never
                # returned True): cut them, or this row would be glued onto them.
                os.truncate(self.path, self._indexed)
            with open(self.path, "a", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
                if handle.tell() == 0:
                    writer.writeheader()
                writer.writerow(csv_row(record, record_json))
                handle.flush()
                os.fsync(handle.fileno())
            self._catch_up()
        return True

    def get(self, job_id: str, index: int) -> StepRecord | None:
        """Return the record for (job_id, index), parsed from record_json, or None."""
        with self._locked(fcntl.LOCK_SH):
            self._catch_up()
            where = self._rows_at.get((job_id, int(index)))
            return None if where is None else self._read_record(*where)

    def records(self, job_id: str) -> list[StepRecord]:
        """Return the job's records ordered by index."""
        with self._locked(fcntl.LOCK_SH):
            self._catch_up()
            indexes = sorted(self._by_job.get(job_id, ()))
            return [self._read_record(*self._rows_at[(job_id, i)]) for i in indexes]


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
