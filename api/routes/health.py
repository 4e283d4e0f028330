"""GET /healthz (the process answers) and GET /readyz (Redis, S3 and DynamoDB answer)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from api.auth import KeyResolver
from api.errors import error_body
from modules.pipeline.settings import Services, Settings
from modules.storage.artifacts import LocalStore, S3Store
from modules.storage.jobs import DynamoJobStore
from modules.storage.steplog import DynamoStepLog, TeeStepLog

router = APIRouter(tags=["health"])

PROBE_TIMEOUT_S = 2.0


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """Liveness: the process serves requests."""
    return {"status": "ok"}


def _aws_client(service: str, settings: Settings) -> Any:
    import boto3
    from botocore.config import Config

    # Short timeouts and no retries: a probe must answer quickly either way.
    config = Config(
        connect_timeout=PROBE_TIMEOUT_S,
        read_timeout=PROBE_TIMEOUT_S,
        retries={"max_attempts": 1, "mode": "standard"},
    )
    return boto3.client(service, region_name=settings.aws_region, config=config)


def dynamo_tables(services: Services, keys: KeyResolver | None) -> list[str]:
    """The DynamoDB tables the service uses."""
    logs: list[Any] = [services.log]
    if isinstance(services.log, TeeStepLog):
        logs = [services.log.primary, *services.log.others]
    tables = [log.table_name for log in logs if isinstance(log, DynamoStepLog)]
    if isinstance(services.jobs, DynamoJobStore):
        tables.append(services.jobs.table_name)
    if keys is not None and keys.table:
        tables.append(keys.table)
    return tables


def readiness_checks(
    settings: Settings, services: Services, keys: KeyResolver | None
) -> dict[str, Callable[[], None]]:
    """One probe per backend this configuration uses."""
    checks: dict[str, Callable[[], None]] = {}
    store = services.store
    if isinstance(store, S3Store):
        checks["s3"] = lambda: _aws_client("s3", settings).head_bucket(Bucket=store.bucket)
    elif isinstance(store, LocalStore):

        def local() -> None:
            if not os.access(store.root, os.W_OK):
                raise OSError(f"{store.root} is not writable")

        checks["store"] = local
    tables = dynamo_tables(services, keys)
    if tables:

        def dynamo() -> None:
            client = _aws_client("dynamodb", settings)
            for table in tables:
                client.describe_table(TableName=table)

        checks["dynamodb"] = dynamo
    if settings.dispatcher == "celery" and settings.redis_url:
        redis_url = settings.redis_url

        def redis_ping() -> None:
            import redis

            client = redis.Redis.from_url(
                redis_url, socket_timeout=PROBE_TIMEOUT_S, socket_connect_timeout=PROBE_TIMEOUT_S
            )
            try:
                client.ping()
            finally:
                client.close()

        checks["redis"] = redis_ping
    return checks


@router.get("/readyz")
def readyz(request: Request) -> JSONResponse:
    """Readiness: 200 when every backend answers, else 503 naming the ones that did not."""
    state = request.app.state
    results: dict[str, str] = {}
    for name, check in readiness_checks(state.settings, state.services, state.keys).items():
        try:
            check()
            results[name] = "ok"
        except Exception as exc:
            # The type only: backend messages can carry hostnames and credentials hints.
            results[name] = f"unavailable ({type(exc).__name__})"
    failed = sorted(name for name, result in results.items() if result != "ok")
    if failed:
        body = error_body("not_ready", f"backends not answering: {', '.join(failed)}")
        return JSONResponse({**body, "checks": results}, status_code=503)
    return JSONResponse({"status": "ready", "checks": results})
