"""Jobs: submit, read, list, stop, artifacts (presigned URLs) and the report."""

from __future__ import annotations

import html
import json
import logging
import re
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Response
from fastapi.responses import HTMLResponse, JSONResponse

from api.deps import CurrentUser, DispatcherDep, ServicesDep, SettingsDep
from api.errors import ConflictError, UnavailableError
from api.quotas import LimitsDep
from api.schemas import (
    ID_PATTERN,
    ArtifactPublic,
    ArtifactsPublic,
    JobCreate,
    JobPublic,
    JobsPublic,
    Progress,
)
from modules.core.jobspec import DEFAULT_PROFILE
from modules.core.records import JobRecord, JobStatus, StepRecord
from modules.errors import NotFoundError
from modules.pipeline.engine import StepTerminator, fail_if_stale, finish, report_key, stop
from modules.pipeline.settings import Services, stale_after_s
from modules.storage.inputs_catalog import check_job_dataset, check_job_inputs
from modules.storage.keys import key_in_user
from modules.storage.model_catalog import get_model_meta

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
logger = logging.getLogger("api")

_ID = re.compile(ID_PATTERN)
ArtifactKind = Literal["model", "file", "report"]
# Served HTML may not load or run anything: a report is a static document.
REPORT_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"


def owned_job(services: Services, job_id: str, user: str) -> JobRecord:
    """The job if it exists and is the user's; the same 404 otherwise, so ids do not leak."""
    job = services.jobs.get(job_id) if _ID.fullmatch(job_id) else None
    if job is None or job.user_id != user:
        raise NotFoundError(f"job {job_id!r} not found")
    return job


def progress_of(job: JobRecord, records: list[StepRecord] | None) -> Progress:
    """Step i of n: from the records when read, else from the job's own fields."""
    total = job.n_steps
    status = job.status
    index = job.step_index
    if records is not None:
        done = len(records)
    elif status == JobStatus.COMPLETED:
        done = total
    else:
        done = index + 1 if status == JobStatus.REJECTED else index
    running = status == JobStatus.INPROGRESS
    return Progress(
        done=done,
        total=total,
        current=index if running else None,
        current_step=job.step_name(index) if running and index < total else None,
    )


def job_public(job: JobRecord, records: list[StepRecord] | None = None) -> JobPublic:
    """The response body for a job."""
    spec = job.spec
    return JobPublic(
        id=job.job_id,
        status=job.status,
        reason=job.reason,
        progress=progress_of(job, records),
        model_id=job.model_id,
        dataset=spec.get("dataset", "digits"),
        profile=spec.get("profile", DEFAULT_PROFILE),
        steps=spec["steps"],
        seed=spec.get("seed", 0),
        repeats=spec.get("repeats", 1),
        attempts=job.attempts,
        created_at=job.created_at or "",
        updated_at=job.updated_at or "",
        records=None if records is None else [r.model_dump(mode="json") for r in records],
    )


@router.post("", status_code=202, response_model=JobPublic)
def create_job(
    body: JobCreate,
    user: CurrentUser,
    services: ServicesDep,
    dispatcher: DispatcherDep,
    limits: LimitsDep,
) -> JobPublic:
    """Validate the job against the step registry, store it, and queue its first step
    (429 while the user has too many jobs running or queued)."""
    from modules.core.jobspec import parse_job_spec

    limits.check_jobs(services, user)

    model_key, model_meta = None, None
    if body.model_id is not None:
        model_meta = get_model_meta(services.store, user_id=user, model_id=body.model_id)
        model_key = model_meta["key"]
    steps = body.job_steps()
    check_job_inputs(services.store, user_id=user, model_meta=model_meta, steps=steps)
    check_job_dataset(model_meta, dataset=body.dataset)
    spec = parse_job_spec(
        {
            "job_id": uuid.uuid4().hex[:20],
            "user_id": user,
            "model": model_key,
            "dataset": body.dataset,
            "profile": body.job_profile(),
            "steps": [call.model_dump() for call in steps],
            "seed": body.seed,
            "repeats": body.repeats,
        }
    )
    if not services.jobs.create(JobRecord.new(spec, model_id=body.model_id)):
        raise ConflictError(f"job id {spec.job_id} already exists; submit again")
    try:
        dispatcher.submit(spec.job_id)
    except Exception as exc:
        logger.error("could not dispatch job %s", spec.job_id, exc_info=exc)
        finish(services, spec.job_id, JobStatus.FAILED, "the job could not be queued")
        raise UnavailableError("the job could not be queued; try again later") from None
    job = services.jobs.get(spec.job_id)
    if job is None:  # only if the store lost a write it acknowledged
        raise UnavailableError("the job store did not keep the job; try again later")
    return job_public(job)


@router.get("", response_model=JobsPublic)
def list_jobs(
    user: CurrentUser,
    services: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=100, description="Page size.")] = 20,
    cursor: Annotated[
        str | None, Query(max_length=512, description="next_cursor of the previous page.")
    ] = None,
) -> JobsPublic:
    """Your jobs, newest first, one page at a time."""
    jobs, next_cursor = services.jobs.list(user, limit=limit, cursor=cursor)
    return JobsPublic(data=[job_public(j) for j in jobs], count=len(jobs), next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobPublic)
def get_job(
    job_id: str, user: CurrentUser, services: ServicesDep, settings: SettingsDep
) -> JobPublic:
    """Status, reason, progress, timestamps and the step records."""
    # The watchdog: a job whose task was lost ends FAILED with the reason, never hangs.
    job = fail_if_stale(
        services, owned_job(services, job_id, user), stale_after=stale_after_s(settings)
    )
    return job_public(job, services.log.records(job_id))


@router.post("/{job_id}/stop", response_model=JobPublic)
def stop_job(
    job_id: str, user: CurrentUser, services: ServicesDep, dispatcher: DispatcherDep
) -> JobPublic:
    """Stop a queued or running job: no later step starts, and the running one is ended
    (its worker process killed) where the dispatcher can, else at its next stop check."""
    job = owned_job(services, job_id, user)
    if job.terminal:
        raise ConflictError(f"job {job_id} is already {job.status}")
    stopped = stop(services, job_id)
    if isinstance(dispatcher, StepTerminator):
        dispatcher.terminate(stopped)
    return job_public(stopped)


def job_artifacts(services: Services, job: JobRecord, *, expires_s: int) -> list[ArtifactPublic]:
    """Every model and file the job's steps wrote, plus its report.json, with download URLs."""
    store = services.store
    user = job.user_id
    found: list[ArtifactPublic] = []

    def add(key: str, *, kind: ArtifactKind, record: StepRecord | None, size: int | None) -> None:
        if not key_in_user(key, user):
            return  # never sign a key outside the owner's prefix
        found.append(
            ArtifactPublic(
                name=key.rsplit("/", 1)[-1],
                key=key,
                kind=kind,
                index=None if record is None else record.index,
                step=None if record is None else record.step,
                size=size,
                url=store.url(key, expires_s=expires_s),
            )
        )

    for record in services.log.records(job.job_id):
        if record.wrote_model and record.output_key is not None:
            add(record.output_key, kind="model", record=record, size=record.output_size)
        for key in record.files.values():
            add(key, kind="file", record=record, size=store.size(key))
    report = report_key(job)
    if store.exists(report):
        add(report, kind="report", record=None, size=store.size(report))
    return found


@router.get("/{job_id}/artifacts", response_model=ArtifactsPublic)
def list_artifacts(
    job_id: str, user: CurrentUser, services: ServicesDep, settings: SettingsDep
) -> ArtifactsPublic:
    """Presigned download URLs for the job's outputs."""
    job = owned_job(services, job_id, user)
    expires = settings.presign_expires_s
    return ArtifactsPublic(data=job_artifacts(services, job, expires_s=expires), expires_in=expires)


def _report_file(records: list[dict[str, Any]], name: str) -> str | None:
    """The key of the last `report` step's file `name` (its self-contained HTML page)."""
    for record in reversed(records):
        key = (record.get("files") or {}).get(name)
        if key:
            return str(key)
    return None


def render_report_html(report: dict[str, Any]) -> str:
    """A minimal, fully escaped HTML page of the report's summary table."""
    from modules.evaluation.summary import summary_row

    columns = ["index", "step", "framework", "size_bytes", "accuracy", "latency_b1_ms", "verdict"]
    rows = [summary_row(r) for r in report.get("steps", [])]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(row.get(c)))}</td>" for c in columns) + "</tr>"
        for row in rows
    )
    title = html.escape(f"MCaaS job {report.get('job_id')}: {report.get('status')}")
    reason = report.get("reason")
    reason_html = f"<p>{html.escape(str(reason))}</p>" if reason else ""
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{title}</title></head><body><h1>{title}</h1>{reason_html}"
        f"<table border='1'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        "</body></html>"
    )


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


@router.get("/{job_id}/report", response_model=None)
def get_report(
    job_id: str,
    user: CurrentUser,
    services: ServicesDep,
    format: Annotated[Literal["json", "html"], Query(description="json or html.")] = "json",
) -> Response:
    """The job's report.json as the engine stored it when the job ended (while it runs, the
    same report of the steps so far); as html, the `report` step's page when that step ran,
    else the report's summary table."""
    from modules.evaluation.summary import job_report

    job = owned_job(services, job_id, user)
    key = report_key(job)
    if services.store.exists(key):
        report = json.loads(services.store.get_bytes(key))
    else:
        records = services.log.records(job_id)
        built = job_report(spec=job.spec, status=job.status, reason=job.reason, records=records)
        report = json.loads(json.dumps(built, default=str))
    if format == "json":
        return JSONResponse(report)
    page = _report_file(report.get("steps", []), "report.html")
    if page is not None and key_in_user(page, user):
        content = services.store.get_bytes(page)
        return HTMLResponse(content, headers={"Content-Security-Policy": REPORT_CSP})
    return HTMLResponse(render_report_html(report), headers={"Content-Security-Policy": REPORT_CSP})
