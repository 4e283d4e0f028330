"""S3 and DynamoDB unreachable for a moment, then back; and an error that is not transient.

The worker reaches moto through a TCP relay that the test cuts and restores on the same
port: to boto3 that is an outage (refused and reset connections) while moto keeps its
state, as S3 and DynamoDB do. A transient error is retried with backoff and the job
completes; a permanent one (the bucket is gone) fails the job at once, with the reason.
"""

from __future__ import annotations

import time
from urllib.parse import urlsplit

import boto3
import pytest

from tests.devstack import DevStack
from tests.integration.faults.conftest import (
    MEASURE,
    TRAIN,
    TcpProxy,
    dump_result,
    orphan_keys,
    submit_job,
    wait_until,
)

pytestmark = pytest.mark.integration

OUTAGE_S = 4.0


@pytest.fixture
def relay(fault_stack: DevStack) -> TcpProxy:
    assert fault_stack.moto_url is not None
    proxy = TcpProxy(int(urlsplit(fault_stack.moto_url).port or 0))
    proxy.start()
    return proxy


def test_a_short_aws_outage_is_retried_and_the_job_completes(
    fault_stack: DevStack, relay: TcpProxy
) -> None:
    fault_stack.overrides["AWS_ENDPOINT_URL"] = relay.url  # the worker's only way to moto
    fault_stack.service_env()
    worker = fault_stack.start_worker()
    relay.stop()  # the step's message reaches the worker through Redis; its first read fails
    services, job_id = submit_job(fault_stack, [TRAIN, MEASURE])  # direct to moto
    time.sleep(OUTAGE_S)
    relay.start()
    job = wait_until(
        lambda: (j := services.jobs.get(job_id)).status in {"COMPLETED", "FAILED"} and j,
        timeout_s=240,
        every_s=0.2,
        what="the job to end",
    )
    assert job.status == "COMPLETED", job.reason
    assert [r.index for r in services.log.records(job_id)] == [0, 1]
    assert orphan_keys(fault_stack, services, job_id) == []
    log = worker.log_tail(1_000_000)
    assert f"job {job_id} step 0: transient error, retry 0" in log  # seen, retried, survived
    retries = log.count(f"job {job_id} step 0: transient error, retry")
    dump_result("aws_outage", {"outage_s": OUTAGE_S, "retries": retries, "status": job.status})


def test_a_permanent_storage_error_fails_the_job_with_the_reason(
    fault_stack: DevStack,
) -> None:
    fault_stack.service_env()
    fault_stack.start_worker()
    bucket = fault_stack.env["MODEL_BUCKET"]
    s3 = boto3.client("s3", endpoint_url=fault_stack.moto_url, region_name="us-east-1")
    for item in s3.list_objects_v2(Bucket=bucket).get("Contents", []):
        s3.delete_object(Bucket=bucket, Key=item["Key"])
    s3.delete_bucket(Bucket=bucket)  # NoSuchBucket: no retry can fix it
    services, job_id = submit_job(fault_stack, [TRAIN, MEASURE], create_resources=False)
    job = wait_until(
        lambda: (j := services.jobs.get(job_id)).status in {"COMPLETED", "FAILED"} and j,
        timeout_s=120,
        every_s=0.2,
        what="the job to fail",
    )
    assert job.status == "FAILED"
    assert "NoSuchBucket" in job.reason or "bucket" in job.reason.lower(), job.reason
    assert job.attempts == 1  # failed at once, not retried
    dump_result("aws_permanent", {"status": job.status, "reason": job.reason})
