"""Job records, the source of truth for a job's owner and state: DynamoDB or SQLite."""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import re
import sqlite3
from collections.abc import Callable, Collection, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from modules.core.records import TERMINAL, JobRecord, JobStatus
from modules.errors import BadInputError, NotFoundError
from modules.storage.dynamo import DynamoTable
from modules.storage.keys import validate_user_id
from modules.storage.ttl import ttl_attribute

# JobStatus and TERMINAL live with the records (modules/core/records.py); re-exported.
__all__ = [
    "TERMINAL",
    "DynamoJobStore",
    "JobStatus",
    "JobStore",
    "SqliteJobStore",
]

CORE_FIELDS = (
    "job_id",
    "user_id",
    "status",
    "spec",
    "n_steps",
    "step_index",
    "reason",
    "attempts",
    "created_at",
    "updated_at",
)
# Extra field naming the task that runs the job's steps (JobStore.begin_step's owner).
OWNER_FIELD = "owner"
IMMUTABLE_FIELDS = frozenset({"job_id", "user_id", "created_at", "updated_at"})
MAX_LIST_LIMIT = 1000

_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_INT_FIELDS = ("n_steps", "step_index", "attempts")


@runtime_checkable
class JobStore(Protocol):
    """Create, read, update and page through job records."""

    def create(self, job: JobRecord | dict[str, Any]) -> bool:
        """Insert a new job with defaults filled; False if job_id already exists."""
        ...

    def get(self, job_id: str) -> JobRecord | None:
        """Return the job record, or None."""
        ...

    def update(self, job_id: str, **fields: Any) -> JobRecord:
        """Set fields plus updated_at and return the new record; NotFoundError if absent."""
        ...

    def update_unless(
        self, job_id: str, statuses: Collection[str], **fields: Any
    ) -> JobRecord | None:
        """update() unless the job's status is one of `statuses` (then None, nothing written),
        decided atomically with the write; NotFoundError if absent."""
        ...

    def begin_step(self, job_id: str, index: int, *, owner: str | None = None) -> JobRecord | None:
        """Mark step `index` running and count an attempt, in one atomic write; return the new
        record. None, writing nothing, when the job is absent or terminal or a later step
        has already begun (step_index > index).

        With an `owner` (the id of the task that runs the job's steps), the job records it,
        and step `index` once begun by one owner is refused to any other: a duplicate of a
        running step's message drops out instead of running alongside it."""
        ...

    def list(
        self, user_id: str, *, limit: int = 50, cursor: str | None = None
    ) -> tuple[list[JobRecord], str | None]:
        """Return one page of the user's jobs, newest first, and the next page's cursor."""
        ...


def now_iso() -> str:
    """Return the current UTC time as ISO-8601 with microseconds (sorts as text)."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def validate_job_id(job_id: str) -> str:
    """Return `job_id` if it matches `^[A-Za-z0-9_-]{1,128}$` (it appears in keys)."""
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
        raise BadInputError(f"invalid job id {job_id!r}: must match ^[A-Za-z0-9_-]{{1,128}}$")
    return job_id


def _check_field(name: str, value: Any) -> Any:
    """Validate one field's type and return it normalised (status as a plain str)."""
    if not _FIELD_NAME.fullmatch(name):
        raise BadInputError(f"invalid job field name {name!r}")
    if name == "status":
        try:
            return str(JobStatus(value))
        except ValueError as exc:
            allowed = ", ".join(JobStatus)
            raise BadInputError(f"invalid job status {value!r}: one of {allowed}") from exc
    if name == "spec" and not isinstance(value, dict):
        raise BadInputError(f"job spec must be a dict, not {type(value).__name__}")
    if name in _INT_FIELDS and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise BadInputError(f"job field {name} must be a non-negative int, got {value!r}")
    if name == "reason" and value is not None and not isinstance(value, str):
        raise BadInputError(f"job reason must be a str or None, got {value!r}")
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise BadInputError(f"job field {name} is not JSON-able: {exc}") from exc
    return value


def filled_record(job: JobRecord | dict[str, Any]) -> dict[str, Any]:
    """Validate a job for create() and fill the defaults."""
    if isinstance(job, JobRecord):
        job = job.to_store()
    if not isinstance(job, dict):
        raise BadInputError(f"a job must be a dict, not {type(job).__name__}")
    missing = [name for name in ("job_id", "user_id", "spec", "n_steps") if name not in job]
    if missing:
        raise BadInputError(f"job is missing required fields: {', '.join(missing)}")
    now = now_iso()
    record: dict[str, Any] = {
        "status": JobStatus.QUEUED,
        "step_index": 0,
        "reason": None,
        "attempts": 0,
        "created_at": now,
        "updated_at": now,
        **job,
    }
    validate_job_id(record["job_id"])
    validate_user_id(record["user_id"])
    for name in ("created_at", "updated_at"):
        if not isinstance(record[name], str):
            raise BadInputError(f"job field {name} must be an ISO-8601 str")
    return {name: _check_field(name, value) for name, value in record.items()}


def check_update(fields: dict[str, Any]) -> dict[str, Any]:
    """Validate update() fields; job_id, user_id and the timestamps cannot be set."""
    frozen = sorted(IMMUTABLE_FIELDS.intersection(fields))
    if frozen:
        raise BadInputError(f"job fields cannot be updated: {', '.join(frozen)}")
    return {name: _check_field(name, value) for name, value in fields.items()}


def _encode_cursor(created_at: str, job_id: str) -> str:
    raw = json.dumps([created_at, job_id]).encode("utf-8")
    return base64.urlsafe_b64encode(raw).decode("ascii")


def _next_cursor(jobs: list[JobRecord]) -> str:
    """The cursor of the page after `jobs` (built from its last job)."""
    last = jobs[-1]
    assert last.created_at is not None  # every stored job has its creation time
    return _encode_cursor(last.created_at, last.job_id)


def _decode_cursor(cursor: str) -> tuple[str, str]:
    try:
        created_at, job_id = json.loads(base64.urlsafe_b64decode(cursor.encode("ascii")))
    except (ValueError, TypeError, UnicodeError, binascii.Error) as exc:
        raise BadInputError(f"invalid job list cursor {cursor!r}") from exc
    if not isinstance(created_at, str) or not isinstance(job_id, str):
        raise BadInputError(f"invalid job list cursor {cursor!r}")
    return created_at, validate_job_id(job_id)


def _check_limit(limit: int) -> int:
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_LIST_LIMIT:
        raise BadInputError(f"limit must be an int in 1..{MAX_LIST_LIMIT}, got {limit!r}")
    return limit


class SqliteJobStore:
    """Job records in one SQLite table (WAL); a connection per call, so threads may share it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(
                """
                CREATE TABLE IF NOT EXISTS jobs (
                    job_id TEXT PRIMARY KEY,
                    user_id TEXT NOT NULL,
                    status TEXT NOT NULL,
                    spec TEXT NOT NULL,
                    n_steps INTEGER NOT NULL,
                    step_index INTEGER NOT NULL,
                    reason TEXT,
                    attempts INTEGER NOT NULL,
                    created_at TEXT NOT NULL,
                    updated_at TEXT NOT NULL,
                    extra TEXT NOT NULL
                )
                """
            )
            conn.execute(
                "CREATE INDEX IF NOT EXISTS jobs_user_created"
                " ON jobs (user_id, created_at DESC, job_id DESC)"
            )

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # isolation_level=None: we issue BEGIN IMMEDIATE ourselves where we read-modify-write.
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        conn.row_factory = sqlite3.Row
        try:
            yield conn
        finally:
            conn.close()

    @staticmethod
    def _to_row(record: dict[str, Any]) -> dict[str, Any]:
        row = {name: record[name] for name in CORE_FIELDS}
        row["spec"] = json.dumps(record["spec"], sort_keys=True)
        extra = {name: value for name, value in record.items() if name not in CORE_FIELDS}
        row["extra"] = json.dumps(extra, sort_keys=True)
        return row

    @staticmethod
    def _from_row(row: sqlite3.Row) -> dict[str, Any]:
        record = {name: row[name] for name in CORE_FIELDS}
        record["spec"] = json.loads(row["spec"])
        record.update(json.loads(row["extra"]))
        return record

    def create(self, job: JobRecord | dict[str, Any]) -> bool:
        """Insert the job with defaults; False if job_id already exists."""
        row = self._to_row(filled_record(job))
        columns = ", ".join(row)
        marks = ", ".join(f":{name}" for name in row)
        with self._connect() as conn:
            try:
                conn.execute(f"INSERT INTO jobs ({columns}) VALUES ({marks})", row)
            except sqlite3.IntegrityError:
                return False
        return True

    def get(self, job_id: str) -> JobRecord | None:
        """Return the job record, or None."""
        with self._connect() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return None if row is None else JobRecord.model_validate(self._from_row(row))

    def update(self, job_id: str, **fields: Any) -> JobRecord:
        """Set fields plus updated_at in one transaction; NotFoundError if absent."""
        changes = check_update(fields)
        record = self._modify(job_id, lambda current: changes)
        assert record is not None  # the change function never refuses
        return record

    def update_unless(
        self, job_id: str, statuses: Collection[str], **fields: Any
    ) -> JobRecord | None:
        """update() unless the status is one of `statuses` (None); NotFoundError if absent."""
        changes = check_update(fields)
        refused = frozenset(str(JobStatus(s)) for s in statuses)
        return self._modify(job_id, lambda cur: None if cur["status"] in refused else changes)

    def begin_step(self, job_id: str, index: int, *, owner: str | None = None) -> JobRecord | None:
        """Step `index` running, attempts + 1; None if absent, terminal, past `index`, or
        (with an owner) `index` begun by another owner."""

        def change(current: dict[str, Any]) -> dict[str, Any] | None:
            if current["status"] in TERMINAL or current["step_index"] > index:
                return None
            if (
                owner is not None
                and current["step_index"] == index
                and current.get(OWNER_FIELD, owner) != owner
            ):
                return None  # begun by another owner
            changes: dict[str, Any] = {
                "status": JobStatus.INPROGRESS.value,
                "step_index": index,
                "attempts": current["attempts"] + 1,
            }
            if owner is not None:
                changes[OWNER_FIELD] = owner
            return changes

        try:
            return self._modify(job_id, change)
        except NotFoundError:
            return None

    def _modify(
        self, job_id: str, change: Callable[[dict[str, Any]], dict[str, Any] | None]
    ) -> JobRecord | None:
        """Read, apply `change` (None: leave the row alone) and write, in one transaction."""
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
                if row is None:
                    raise NotFoundError(f"job {job_id!r} not found")
                current = self._from_row(row)
                changes = change(current)
                if changes is None:
                    conn.execute("ROLLBACK")
                    return None
                record = {**current, **changes, "updated_at": now_iso()}
                new_row = self._to_row(record)
                assignments = ", ".join(f"{name} = :{name}" for name in new_row if name != "job_id")
                conn.execute(f"UPDATE jobs SET {assignments} WHERE job_id = :job_id", new_row)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return JobRecord.model_validate(record)

    def list(
        self, user_id: str, *, limit: int = 50, cursor: str | None = None
    ) -> tuple[list[JobRecord], str | None]:
        """Return up to `limit` of the user's jobs, newest first, and the next cursor or None."""
        validate_user_id(user_id)
        _check_limit(limit)
        query = "SELECT * FROM jobs WHERE user_id = ?"
        params: list[Any] = [user_id]
        if cursor is not None:
            created_at, job_id = _decode_cursor(cursor)
            query += " AND (created_at < ? OR (created_at = ? AND job_id < ?))"
            params += [created_at, created_at, job_id]
        query += " ORDER BY created_at DESC, job_id DESC LIMIT ?"
        params.append(limit + 1)
        with self._connect() as conn:
            rows = conn.execute(query, params).fetchall()
        jobs = [JobRecord.model_validate(self._from_row(row)) for row in rows[:limit]]
        more = len(rows) > limit
        next_cursor = _next_cursor(jobs) if more else None
        return jobs, next_cursor


USER_INDEX = "user_id-created_at"


def _status_not_in(statuses: list[str]) -> tuple[str, dict[str, Any]]:
    """A DynamoDB condition (on the name #status) and its values: status is none of these."""
    values = {f":s{i}": {"S": status} for i, status in enumerate(statuses)}
    if not values:
        return "attribute_exists(#status)", values
    return f"NOT #status IN ({', '.join(values)})", values


class DynamoJobStore(DynamoTable):
    """Job records in DynamoDB: PK job_id, GSI user_id-created_at for listing a user's jobs."""

    def ensure_table(self) -> None:
        """Create the table and its GSI (PAY_PER_REQUEST) if missing."""
        self._create_table(
            AttributeDefinitions=[
                {"AttributeName": "job_id", "AttributeType": "S"},
                {"AttributeName": "user_id", "AttributeType": "S"},
                {"AttributeName": "created_at", "AttributeType": "S"},
            ],
            KeySchema=[{"AttributeName": "job_id", "KeyType": "HASH"}],
            GlobalSecondaryIndexes=[
                {
                    "IndexName": USER_INDEX,
                    "KeySchema": [
                        {"AttributeName": "user_id", "KeyType": "HASH"},
                        {"AttributeName": "created_at", "KeyType": "RANGE"},
                    ],
                    "Projection": {"ProjectionType": "ALL"},
                }
            ],
        )

    @staticmethod
    def _attr(name: str, value: Any) -> dict[str, Any]:
        """Encode one field: strings and ints natively, spec and extras as JSON strings."""
        if name == "reason" and value is None:
            return {"NULL": True}
        if name in _INT_FIELDS:
            return {"N": str(value)}
        if name in CORE_FIELDS and name != "spec":
            return {"S": value}
        return {"S": json.dumps(value, sort_keys=True)}

    @staticmethod
    def _to_item(record: dict[str, Any]) -> dict[str, Any]:
        item = {name: DynamoJobStore._attr(name, record[name]) for name in CORE_FIELDS}
        # Extra fields live in one map of JSON strings so update() can set each one atomically.
        item["extra"] = {
            "M": {
                name: {"S": json.dumps(value, sort_keys=True)}
                for name, value in record.items()
                if name not in CORE_FIELDS
            }
        }
        return item

    @staticmethod
    def _from_item(item: dict[str, Any]) -> dict[str, Any]:
        record: dict[str, Any] = {}
        for name in CORE_FIELDS:
            attr = item[name]
            if "NULL" in attr:
                record[name] = None
            elif "N" in attr:
                record[name] = int(attr["N"])
            elif name == "spec":
                record[name] = json.loads(attr["S"])
            else:
                record[name] = attr["S"]
        for name, attr in item.get("extra", {}).get("M", {}).items():
            record[name] = json.loads(attr["S"])
        return record

    def create(self, job: JobRecord | dict[str, Any]) -> bool:
        """Put the job with attribute_not_exists(job_id); False if it already exists."""

        item = {**self._to_item(filled_record(job)), **ttl_attribute(self.ttl_days)}
        return self._put_new(item)

    def get(self, job_id: str) -> JobRecord | None:
        """Return the job record (consistent read), or None."""
        response = self.client.get_item(
            TableName=self.table_name, Key={"job_id": {"S": job_id}}, ConsistentRead=True
        )
        item = response.get("Item")
        return None if item is None else JobRecord.model_validate(self._from_item(item))

    def update(self, job_id: str, **fields: Any) -> JobRecord:
        """One conditional UpdateItem setting fields plus updated_at; NotFoundError if absent."""
        record = self._update(job_id, check_update(fields))
        if record is None:
            raise NotFoundError(f"job {job_id!r} not found")
        return record

    def update_unless(
        self, job_id: str, statuses: Collection[str], **fields: Any
    ) -> JobRecord | None:
        """update() unless the status is one of `statuses` (None); NotFoundError if absent."""
        refused = sorted(str(JobStatus(s)) for s in statuses)
        condition, values = _status_not_in(refused)
        record = self._update(job_id, check_update(fields), condition=condition, values=values)
        if record is None and self.get(job_id) is None:  # the rare refusal: absent or refused?
            raise NotFoundError(f"job {job_id!r} not found")
        return record

    def begin_step(self, job_id: str, index: int, *, owner: str | None = None) -> JobRecord | None:
        """Step `index` running, attempts + 1; None if absent, terminal, past `index`, or
        (with an owner) `index` begun by another owner."""
        condition, values = _status_not_in(sorted(TERMINAL))
        values = {**values, ":index": {"N": str(index)}, ":one": {"N": "1"}}
        changes: dict[str, Any] = {"status": JobStatus.INPROGRESS.value, "step_index": index}
        names: dict[str, str] = {}
        if owner is None:
            condition += " AND step_index <= :index"
        else:
            changes[OWNER_FIELD] = owner
            names.update({"#extra": "extra", "#owner": OWNER_FIELD})
            values[":owner"] = {"S": json.dumps(owner, sort_keys=True)}
            condition += (
                " AND (step_index < :index OR (step_index = :index AND"
                " (attribute_not_exists(#extra.#owner) OR #extra.#owner = :owner)))"
            )
        return self._update(
            job_id,
            check_update(changes),
            condition=condition,
            values=values,
            names=names,
            add="attempts :one",
        )

    def _update(
        self,
        job_id: str,
        changes: dict[str, Any],
        *,
        condition: str | None = None,
        values: dict[str, Any] | None = None,
        names: dict[str, str] | None = None,
        add: str | None = None,
    ) -> JobRecord | None:
        """One UpdateItem on an existing job; None when it or `condition` does not hold."""

        changes = {**changes, "updated_at": now_iso()}
        names = dict(names or {})
        values = dict(values or {})
        assignments: list[str] = []
        for i, (name, value) in enumerate(changes.items()):
            names[f"#f{i}"] = name
            if name in CORE_FIELDS:
                values[f":v{i}"] = self._attr(name, value)
                assignments.append(f"#f{i} = :v{i}")
            else:
                values[f":v{i}"] = {"S": json.dumps(value, sort_keys=True)}
                names["#extra"] = "extra"
                assignments.append(f"#extra.#f{i} = :v{i}")
        expression = "SET " + ", ".join(assignments) + (f" ADD {add}" if add else "")
        if condition is not None:
            names["#status"] = "status"
        response = self._conditional(
            self.client.update_item,
            TableName=self.table_name,
            Key={"job_id": {"S": job_id}},
            UpdateExpression=expression,
            ConditionExpression="attribute_exists(job_id)"
            + (f" AND {condition}" if condition else ""),
            ExpressionAttributeNames=names,
            ExpressionAttributeValues=values,
            ReturnValues="ALL_NEW",
        )
        if response is None:
            return None
        return JobRecord.model_validate(self._from_item(response["Attributes"]))

    def list(
        self, user_id: str, *, limit: int = 50, cursor: str | None = None
    ) -> tuple[list[JobRecord], str | None]:
        """Query the GSI newest first; the cursor is built from the page's last job."""
        validate_user_id(user_id)
        _check_limit(limit)
        kwargs: dict[str, Any] = {
            "TableName": self.table_name,
            "IndexName": USER_INDEX,
            "KeyConditionExpression": "user_id = :u",
            "ExpressionAttributeValues": {":u": {"S": user_id}},
            "ScanIndexForward": False,
        }
        if cursor is not None:
            created_at, job_id = _decode_cursor(cursor)
            kwargs["ExclusiveStartKey"] = {
                "job_id": {"S": job_id},
                "user_id": {"S": user_id},
                "created_at": {"S": created_at},
            }
        # Ask for one more than the page so the cursor is None exactly when nothing follows.
        items: list[dict[str, Any]] = []
        while len(items) <= limit:
            kwargs["Limit"] = limit + 1 - len(items)
            response = self.client.query(**kwargs)
            items.extend(response.get("Items", []))
            last = response.get("LastEvaluatedKey")
            if not last:
                break
            kwargs["ExclusiveStartKey"] = last
        jobs = [JobRecord.model_validate(self._from_item(item)) for item in items[:limit]]
        more = len(items) > limit
        next_cursor = _next_cursor(jobs) if more else None
        return jobs, next_cursor
