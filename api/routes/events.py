"""GET /v1/jobs/{id}/events: a job's progress as Server-Sent Events.

One `progress` event on connect and one whenever the job moves (status, step index, or
what the running step reports of itself, like an int8 search's trial count), then
an `end` event when it finishes, and the stream closes. Comment lines keep idle proxies from
closing the connection. The dashboard's EventSource cannot send headers, so besides the
X-API-Key header this endpoint takes the dashboard's session cookie (a GET that changes
nothing, so no CSRF token is needed). `mcaas submit --follow` reads the same stream.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Security
from fastapi.responses import StreamingResponse
from fastapi.security import APIKeyHeader
from starlette.concurrency import run_in_threadpool

from api.auth import API_KEY_HEADER
from api.deps import ServicesDep, current_user
from api.errors import UnauthorizedError
from api.routes.jobs import owned_job, progress_of
from api.ui.session import read_session
from modules.core.records import TERMINAL, JobRecord, JobStatus, StepRecord
from modules.pipeline.settings import Services

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

POLL_INTERVAL_S = 0.5
KEEPALIVE_S = 15.0
# A client that stays longer reconnects (EventSource does so by itself after `retry`).
MAX_STREAM_S = 3600.0
RETRY_MS = 2000

_api_key = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="Your API key.")


def key_or_session_user(
    request: Request, api_key: Annotated[str | None, Security(_api_key)] = None
) -> str:
    """The user of the X-API-Key header, else of the dashboard session cookie; 401 if neither."""
    if api_key:
        return current_user(request, api_key)
    session = read_session(request)
    if session is None:
        raise UnauthorizedError(
            f"missing API key: send it in the {API_KEY_HEADER} header or log in at /ui/login"
        )
    return session.user_id


def step_states(job: JobRecord, records: list[StepRecord]) -> list[dict[str, Any]]:
    """Each step of the job with its state: done, rejected, running, failed, pending, skipped."""
    status = job.status
    by_index = {r.index: r for r in records}
    index = job.step_index
    out = []
    for i, call in enumerate(job.spec["steps"]):
        record = by_index.get(i)
        if record is not None:
            state = "rejected" if record.rejected else "done"
        elif status == JobStatus.INPROGRESS and i == index:
            state = "running"
        elif status == JobStatus.FAILED and i == index:
            state = "failed"
        elif status in TERMINAL:
            state = "skipped"
        else:
            state = "pending"
        out.append({"index": i, "name": call["name"], "state": state})
    return out


def running_detail(job: JobRecord) -> dict[str, Any] | None:
    """What the running step last reported of itself (a search's trials), else None."""
    reported = getattr(job, "step_progress", None)
    if job.status != JobStatus.INPROGRESS or not isinstance(reported, dict):
        return None
    if reported.get("index") != job.step_index:
        return None  # an earlier step's last report
    return reported


def job_event(job: JobRecord, records: list[StepRecord]) -> dict[str, Any]:
    """The payload of one progress event."""
    progress = progress_of(job, records)
    detail = running_detail(job)
    total = max(progress.total, 1)
    done = min(progress.done, progress.total)
    percent = 100 if job.status == JobStatus.COMPLETED else int(100 * done / total)
    return {
        "id": job.job_id,
        "status": job.status,
        "reason": job.reason,
        "done": done,
        "total": progress.total,
        "percent": percent,
        "current": progress.current,
        "current_step": progress.current_step,
        "step_progress": detail,
        "detail": str(detail.get("text") or "") if detail else None,
        "steps": step_states(job, records),
        "updated_at": job.updated_at,
    }


def sse(event: str, data: dict[str, Any]) -> bytes:
    """One SSE frame."""
    return f"event: {event}\ndata: {json.dumps(data, default=str)}\n\n".encode()


def _state(services: Services, job_id: str) -> tuple[JobRecord, list[StepRecord]]:
    job = services.jobs.get(job_id)
    if job is None:  # deleted while watched: report it as ended rather than hang
        raise LookupError(job_id)
    return job, services.log.records(job_id)


async def job_events(request: Request, services: Services, job_id: str) -> AsyncIterator[bytes]:
    """Progress events until the job ends, the client leaves, or MAX_STREAM_S passes."""
    import anyio

    yield f"retry: {RETRY_MS}\n\n".encode()
    started = last_sent = time.monotonic()
    seen: tuple[Any, ...] | None = None
    while time.monotonic() - started < MAX_STREAM_S:
        try:
            job, records = await run_in_threadpool(_state, services, job_id)
        except LookupError:
            return
        detail = running_detail(job)
        mark = (job.status, job.step_index, len(records), job.reason, detail and detail.get("text"))
        if job.terminal:
            yield sse("end", job_event(job, records))
            return
        if mark != seen:
            seen = mark
            last_sent = time.monotonic()
            yield sse("progress", job_event(job, records))
        elif time.monotonic() - last_sent > KEEPALIVE_S:
            last_sent = time.monotonic()
            yield b": keep-alive\n\n"
        if await request.is_disconnected():
            return
        await anyio.sleep(POLL_INTERVAL_S)


@router.get("/{job_id}/events", response_class=StreamingResponse)
def stream_job_events(
    job_id: str,
    request: Request,
    user: Annotated[str, Depends(key_or_session_user)],
    services: ServicesDep,
) -> StreamingResponse:
    """Server-Sent Events: `progress` while the job runs, then `end` with its final state."""
    owned_job(services, job_id, user)
    return StreamingResponse(
        job_events(request, services, job_id),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
