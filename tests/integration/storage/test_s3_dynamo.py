"""S3Store, DynamoStepLog and DynamoJobStore against a real moto server over HTTP."""

from __future__ import annotations

import re
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import boto3
import pytest

from modules.core.records import StepRecord
from modules.errors import BadInputError, NotFoundError
from modules.storage.artifacts import S3Store
from modules.storage.jobs import DynamoJobStore, JobStatus
from modules.storage.steplog import DYNAMO_INLINE_LIMIT, DynamoStepLog
from tests.unit.storage.jobstore_guards import (
    check_begin_step,
    check_begin_step_with_owner,
    check_update_unless,
)

pytestmark = pytest.mark.integration


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def s3_store(moto_endpoint: str) -> S3Store:
    store = S3Store(unique("mcaas-test"), endpoint_url=moto_endpoint)
    store.ensure_bucket()
    store.ensure_bucket()  # idempotent
    return store


@pytest.fixture
def step_log(moto_endpoint: str, s3_store: S3Store) -> DynamoStepLog:
    log = DynamoStepLog(unique("steps"), overflow_store=s3_store)
    log.ensure_table()
    log.ensure_table()  # idempotent
    return log


@pytest.fixture
def job_store(moto_endpoint: str) -> DynamoJobStore:
    store = DynamoJobStore(unique("jobs"))
    store.ensure_table()
    return store


def step_record(index: int, **extra: Any) -> StepRecord:
    record: dict[str, Any] = {
        "job_id": "job1",
        "index": index,
        "step": "quantize_dynamic",
        "user_id": "alice",
        "profile": "mcu-8mb",
        "output_size": 1_234_567,
        "metrics": {"accuracy": {"mean": 0.961, "std": 0.004, "n": 5}, "drop": None},
        "seconds": 0.125,
    }
    record.update(extra)
    return StepRecord.model_validate(record)


def test_endpoint_comes_from_the_environment(moto_endpoint: str) -> None:
    # No endpoint_url given: boto3 must pick AWS_ENDPOINT_URL up by itself.
    store = S3Store(unique("env-bucket"))
    store.ensure_bucket()
    store.put_bytes("users/alice/x.bin", b"env")
    raw = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    assert raw.get_object(Bucket=store.bucket, Key="users/alice/x.bin")["Body"].read() == b"env"


def test_s3_store_put_get_exists_size_delete(s3_store: S3Store) -> None:
    key = "users/alice/models/m1/model.pt"
    assert not s3_store.exists(key)
    s3_store.put_bytes(key, b"\x00\x01weights")
    assert s3_store.exists(key)
    assert s3_store.get_bytes(key) == b"\x00\x01weights"
    assert s3_store.size(key) == 9
    s3_store.delete(key)
    assert not s3_store.exists(key)
    s3_store.delete(key)  # absent: no error
    with pytest.raises(NotFoundError, match=re.escape(key)):
        s3_store.get_bytes(key)
    with pytest.raises(NotFoundError, match=re.escape(key)):
        s3_store.size(key)


def test_s3_store_list_is_sorted_and_prefix_scoped(s3_store: S3Store) -> None:
    keys = ["users/alice/m/b", "users/alice/m/a", "users/alice/j/1/x", "users/alice2/m/c"]
    for key in keys:
        s3_store.put_bytes(key, b"1")
    assert s3_store.list("users/alice/m/") == ["users/alice/m/a", "users/alice/m/b"]
    assert s3_store.list("users/alice/") == sorted(keys[:3])
    assert s3_store.list("users/bob/") == []
    with pytest.raises(BadInputError):
        s3_store.list("users/")


def test_s3_store_list_follows_pagination(s3_store: S3Store) -> None:
    keys = [f"users/alice/many/{i:04d}" for i in range(1005)]  # S3 pages hold 1000 keys
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda key: s3_store.put_bytes(key, b""), keys))
    assert s3_store.list("users/alice/many/") == keys


def test_s3_presigned_url_serves_the_bytes(s3_store: S3Store) -> None:
    key = "users/alice/reports/r.html"
    payload = bytes(range(256)) * 10
    s3_store.put_bytes(key, payload)
    url = s3_store.url(key, expires_s=120)
    assert "Signature" in url or "X-Amz-Signature" in url
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == payload


@pytest.mark.parametrize(
    "key", ["models/x", "users/alice/../bob/x", "/users/alice/x", "users/alice", "users/a/b\\c"]
)
def test_s3_store_rejects_keys_outside_users(s3_store: S3Store, key: str) -> None:
    with pytest.raises(BadInputError):
        s3_store.put_bytes(key, b"x")
    with pytest.raises(BadInputError):
        s3_store.get_bytes(key)
    with pytest.raises(BadInputError):
        s3_store.url(key)
    raw = s3_store.client.list_objects_v2(Bucket=s3_store.bucket)
    assert raw.get("KeyCount", 0) == 0


def test_dynamo_steplog_appends_once(step_log: DynamoStepLog) -> None:
    record = step_record(0)
    assert step_log.append(record) is True
    assert step_log.append(step_record(0, seconds=9.0)) is False
    assert step_log.get("job1", 0) == record
    items = step_log.client.scan(TableName=step_log.table_name)["Items"]
    assert len(items) == 1
    item = items[0]
    assert item["step"] == {"S": "0000"}
    assert item["step_name"] == {"S": "quantize_dynamic"}
    assert item["user_id"] == {"S": "alice"}
    assert item["output_size"] == {"N": "1234567"}
    assert "created_at" in item
    assert "record_json" in item


def test_dynamo_steplog_orders_by_zero_padded_index(step_log: DynamoStepLog) -> None:
    for index in (10, 2, 0):
        assert step_log.append(step_record(index))
    step_log.append(step_record(1, job_id="other"))
    assert [r.index for r in step_log.records("job1")] == [0, 2, 10]
    keys = step_log.client.query(
        TableName=step_log.table_name,
        KeyConditionExpression="job_id = :j",
        ExpressionAttributeValues={":j": {"S": "job1"}},
    )["Items"]
    assert [k["step"]["S"] for k in keys] == ["0000", "0002", "0010"]
    assert step_log.get("job1", 5) is None
    assert step_log.records("nobody") == []


def test_dynamo_steplog_overflows_large_records_to_s3(
    step_log: DynamoStepLog, s3_store: S3Store
) -> None:
    series = [i * 0.001 for i in range(60_000)]
    record = step_record(3, latency_series_ms=series)
    assert step_log.append(record) is True
    key = "users/alice/records/job1/0003.json"
    assert s3_store.exists(key)
    assert s3_store.size(key) > DYNAMO_INLINE_LIMIT
    item = step_log.client.get_item(
        TableName=step_log.table_name, Key={"job_id": {"S": "job1"}, "step": {"S": "0003"}}
    )["Item"]
    assert item["record_ref"] == {"S": key}
    assert "record_json" not in item
    assert step_log.get("job1", 3) == record
    assert step_log.records("job1") == [record]
    # A duplicate must not overwrite the stored JSON.
    assert step_log.append(step_record(3, latency_series_ms=[0.0] * 60_000)) is False
    assert step_log.get("job1", 3) == record


def test_dynamo_steplog_without_overflow_store_rejects_large(moto_endpoint: str) -> None:
    log = DynamoStepLog(unique("steps"))
    log.ensure_table()
    with pytest.raises(BadInputError, match="too big"):
        log.append(step_record(0, blob="x" * (DYNAMO_INLINE_LIMIT + 1)))
    assert log.get("job1", 0) is None


def test_dynamo_jobstore_create_get_update(job_store: DynamoJobStore) -> None:
    job = {
        "job_id": "j1",
        "user_id": "alice",
        "status": JobStatus.QUEUED,
        "spec": {"steps": [{"name": "prune", "params": {"ratio": 0.5}}], "seed": 0},
        "n_steps": 3,
        "model_key": "users/alice/models/m1/model.pt",
    }
    assert job_store.create(job) is True
    assert job_store.create({**job, "user_id": "mallory"}) is False
    stored = job_store.get("j1")
    assert stored is not None
    assert stored.user_id == "alice"
    assert stored.spec == job["spec"]
    assert stored.status == "QUEUED"
    assert (stored.step_index, stored.attempts, stored.reason) == (0, 0, None)
    assert stored.model_key == "users/alice/models/m1/model.pt"
    assert job_store.get("missing") is None

    updated = job_store.update(
        "j1",
        status=JobStatus.REJECTED,
        reason="parity gate failed",
        step_index=2,
        attempts=1,
        metrics={"max_abs_diff": 0.25, "labels": [1, 2]},
    )
    assert updated.status == "REJECTED"
    assert updated.reason == "parity gate failed"
    assert updated.step_index == 2
    assert updated.metrics == {"max_abs_diff": 0.25, "labels": [1, 2]}
    assert updated.updated_at > stored.updated_at
    assert updated.created_at == stored.created_at
    assert job_store.get("j1") == updated
    assert job_store.update("j1", reason=None).reason is None
    with pytest.raises(NotFoundError, match="nope"):
        job_store.update("nope", status="FAILED")
    assert job_store.get("nope") is None


def test_dynamo_jobstore_lists_newest_first_with_cursor(job_store: DynamoJobStore) -> None:
    for i in range(5):
        created = f"2024-01-01T00:00:0{i}.000000+00:00"
        job_store.create(
            {
                "job_id": f"j{i}",
                "user_id": "alice",
                "spec": {},
                "n_steps": 1,
                "created_at": created,
                "updated_at": created,
            }
        )
    job_store.create({"job_id": "b0", "user_id": "bob", "spec": {}, "n_steps": 1})
    seen: list[str] = []
    page, cursor = job_store.list("alice", limit=2)
    seen += [j.job_id for j in page]
    while cursor is not None:
        page, cursor = job_store.list("alice", limit=2, cursor=cursor)
        seen += [j.job_id for j in page]
    assert seen == ["j4", "j3", "j2", "j1", "j0"]
    everything, cursor = job_store.list("alice", limit=5)
    assert len(everything) == 5
    assert cursor is None
    assert [j.job_id for j in job_store.list("bob")[0]] == ["b0"]
    assert job_store.list("carol") == ([], None)


def test_dynamo_jobstore_begin_step_is_one_guarded_write(job_store: DynamoJobStore) -> None:
    check_begin_step(job_store)


def test_begin_step_with_an_owner_refuses_a_second_owner(job_store: DynamoJobStore) -> None:
    check_begin_step_with_owner(job_store)


def test_dynamo_jobstore_update_unless(job_store: DynamoJobStore) -> None:
    check_update_unless(job_store)


def test_records_carry_expires_at_when_a_ttl_is_set(moto_endpoint: str) -> None:
    import time

    jobs = DynamoJobStore(unique("jobs"), ttl_days=7)
    jobs.ensure_table()
    steps = DynamoStepLog(unique("steps"), ttl_days=7)
    steps.ensure_table()
    before = int(time.time())
    job = {"job_id": "t1", "user_id": "alice", "spec": {"steps": []}, "n_steps": 1}
    assert jobs.create(job)
    assert steps.append(step_record(0, job_id="t1"))
    client = boto3.client("dynamodb")
    job_item = client.get_item(TableName=jobs.table_name, Key={"job_id": {"S": "t1"}})["Item"]
    step_item = client.query(
        TableName=steps.table_name,
        KeyConditionExpression="job_id = :j",
        ExpressionAttributeValues={":j": {"S": "t1"}},
    )["Items"][0]
    for item in (job_item, step_item):
        expires = int(item["expires_at"]["N"])
        assert before + 7 * 86_400 <= expires <= int(time.time()) + 7 * 86_400
    # The record reads back unchanged: expires_at is the table's, not the record's.
    assert "expires_at" not in (jobs.get("t1") or {})
    assert steps.get("t1", 0) == step_record(0, job_id="t1")
    # Without a TTL nothing expires.
    plain = DynamoJobStore(jobs.table_name)
    assert plain.create({**job, "job_id": "t2"})
    item = client.get_item(TableName=jobs.table_name, Key={"job_id": {"S": "t2"}})["Item"]
    assert "expires_at" not in item
