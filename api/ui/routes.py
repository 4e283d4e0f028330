"""The dashboard's pages under /ui: login, jobs, one job (live progress, table, plots,
downloads), the report, and the upload form. Server-rendered Jinja2 with autoescape on,
so every name a user chose (file names, report titles, reasons) renders as text.

Pages call the same functions as the REST routes (job creation, ownership checks, artifact
listing, the report), with the user taken from the session cookie instead of the header.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path
from typing import Annotated, Any, cast
from urllib.parse import quote

from fastapi import APIRouter, FastAPI, Form, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from api.deps import DispatcherDep, ServicesDep, SettingsDep
from api.errors import status_for
from api.routes.events import job_event, step_states
from api.routes.jobs import create_job, get_report, job_artifacts, owned_job
from api.schemas import JobCreate
from api.ui.forms import receive_upload_form
from api.ui.plots import PLOTS, plot_png
from api.ui.session import (
    Session,
    clear_session_cookie,
    csrf_ok,
    new_session,
    read_session,
    session_secret,
    set_session_cookie,
)
from api.ui.views import job_headline, step_rows
from modules.core.jobspec import DEFAULT_PROFILE
from modules.core.records import JobRecord
from modules.errors import BadInputError, McaasError, NotFoundError
from modules.pipeline.presets import PRESETS, get_preset
from modules.pipeline.settings import Services
from modules.storage.model_catalog import (
    get_model_meta,
    list_model_metas,
    save_upload,
    validate_model_bytes,
)

HERE = Path(__file__).resolve().parent
TEMPLATES_DIR = HERE.parent / "templates"
STATIC_DIR = HERE / "static"
STATIC_FILES = {"dashboard.css": "text/css", "job.js": "text/javascript"}

# Pages load scripts, styles and images from this origin only; nothing may frame them.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

templates = Jinja2Templates(
    env=Environment(loader=FileSystemLoader(TEMPLATES_DIR), autoescape=True)
)
router = APIRouter(prefix="/ui", include_in_schema=False)


class LoginRequired(Exception):
    """No valid session: the page answers with a redirect to the login form."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


def _login_redirect(request: Request, exc: Exception) -> Response:
    next_path = cast(LoginRequired, exc).next_path  # registered for LoginRequired only
    return RedirectResponse(f"/ui/login?next={quote(next_path, safe='/')}", status_code=303)


def install_ui(app: FastAPI) -> None:
    """Add the dashboard's routes and its login redirect to the app."""
    app.add_exception_handler(LoginRequired, _login_redirect)
    app.include_router(router)


def require_session(request: Request) -> Session:
    """The logged-in session, or LoginRequired (a redirect back here after login)."""
    session = read_session(request)
    if session is None:
        raise LoginRequired(request.url.path)
    return session


def page(
    request: Request,
    name: str,
    context: dict[str, Any],
    *,
    session: Session | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    """Render a template with the page's security headers."""
    return templates.TemplateResponse(
        request,
        name,
        {"session": session, "presets": PRESETS, **context},
        status_code=status_code,
        headers=PAGE_HEADERS,
    )


def _safe_next(value: str | None) -> str:
    # Only our own pages: "//evil.example" or "https://..." would be an open redirect.
    if value and value.startswith("/ui/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/ui/jobs"


# --- login -----------------------------------------------------------------------------------


@router.get("", include_in_schema=False)
def ui_root() -> RedirectResponse:
    """The dashboard's front page is the jobs list."""
    return RedirectResponse("/ui/jobs", status_code=303)


@router.get("/login")
def login_form(request: Request, next: str | None = None) -> HTMLResponse:
    """The API-key login form."""
    enabled = session_secret(request) is not None
    return page(
        request,
        "login.html",
        {"next": _safe_next(next), "error": None, "enabled": enabled},
        status_code=200 if enabled else 503,
    )


@router.post("/login")
def login(
    request: Request,
    api_key: Annotated[str, Form(max_length=256)] = "",
    next: Annotated[str, Form(max_length=2048)] = "/ui/jobs",
) -> Response:
    """Check the key like the API does; on success set the session cookie and go on."""
    secret = session_secret(request)
    if secret is None:
        return page(
            request,
            "login.html",
            {"next": "/ui/jobs", "error": None, "enabled": False},
            status_code=503,
        )
    user = request.app.state.keys.user_for(api_key) if api_key else None
    if user is None:
        return page(
            request,
            "login.html",
            {"next": _safe_next(next), "error": "That API key is not valid.", "enabled": True},
            status_code=401,
        )
    response = RedirectResponse(_safe_next(next), status_code=303)
    set_session_cookie(
        response, new_session(user), secret=secret, secure=request.url.scheme == "https"
    )
    return response


@router.post("/logout")
def logout(request: Request, csrf: Annotated[str, Form(max_length=256)] = "") -> Response:
    """End the session (the form's token must match, so no other site can log you out)."""
    session = require_session(request)
    if not csrf_ok(session, csrf):
        raise BadInputError("the form is out of date; reload the page and try again")
    response = RedirectResponse("/ui/login", status_code=303)
    clear_session_cookie(response)
    return response


# --- jobs ------------------------------------------------------------------------------------


def _model_names(services: Services, user: str, jobs: list[JobRecord]) -> dict[str, str]:
    names: dict[str, str] = {}
    for job in jobs:
        model_id = job.model_id
        if model_id and model_id not in names:
            try:
                names[model_id] = get_model_meta(services.store, user_id=user, model_id=model_id)[
                    "filename"
                ]
            except NotFoundError:
                names[model_id] = model_id
    return names


@router.get("/jobs")
def jobs_page(
    request: Request,
    services: ServicesDep,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> HTMLResponse:
    """Your jobs: status, profile, size reduction, accuracy change and gate verdicts."""
    session = require_session(request)
    try:
        jobs, next_cursor = services.jobs.list(session.user_id, limit=20, cursor=cursor)
    except McaasError as exc:
        return _error_page(request, session, exc)
    names = _model_names(services, session.user_id, jobs)
    rows = []
    for job in jobs:
        records = services.log.records(job.job_id)
        rows.append(
            {
                "job": job,
                "model": names.get(job.model_id or "", "(trained)"),
                "event": job_event(job, records),
                **job_headline(job, records),
            }
        )
    return page(request, "jobs.html", {"rows": rows, "next_cursor": next_cursor}, session=session)


def _job_context(services: Services, job: JobRecord, user: str) -> dict[str, Any]:
    records = services.log.records(job.job_id)
    model = None
    if job.model_id:
        try:
            model = get_model_meta(services.store, user_id=user, model_id=job.model_id)
        except NotFoundError:
            model = None
    artifacts = job_artifacts(services, job, expires_s=60)
    return {
        "job": job,
        "model": model,
        "event": job_event(job, records),
        "states": step_states(job, records),
        "rows": step_rows(records),
        "headline": job_headline(job, records),
        "artifacts": artifacts,
        "plots": PLOTS if records else {},
        "version": f"{len(records)}-{job.status}",
        "terminal": job.terminal,
    }


@router.get("/jobs/{job_id}")
def job_page(job_id: str, request: Request, services: ServicesDep) -> HTMLResponse:
    """One job: live progress, the step timeline and table, the plots and the downloads."""
    session = require_session(request)
    try:
        job = owned_job(services, job_id, session.user_id)
    except McaasError as exc:
        return _error_page(request, session, exc)
    return page(request, "job.html", _job_context(services, job, session.user_id), session=session)


@router.get("/jobs/{job_id}/results")
def job_results(job_id: str, request: Request, services: ServicesDep) -> HTMLResponse:
    """The table, plots and downloads of a job as an HTML fragment (the page refreshes it)."""
    session = require_session(request)
    job = owned_job(services, job_id, session.user_id)
    return page(
        request, "_results.html", _job_context(services, job, session.user_id), session=session
    )


@router.get("/jobs/{job_id}/progress")
def job_progress(job_id: str, request: Request, services: ServicesDep) -> JSONResponse:
    """The same payload as one SSE event: the page polls this when EventSource fails."""
    session = require_session(request)
    job = owned_job(services, job_id, session.user_id)
    return JSONResponse(job_event(job, services.log.records(job_id)), headers=PAGE_HEADERS)


@router.get("/jobs/{job_id}/plots/{name}.png")
def job_plot(job_id: str, name: str, request: Request, services: ServicesDep) -> Response:
    """A plot of the job's step records (see api/ui/plots.py)."""
    session = require_session(request)
    owned_job(services, job_id, session.user_id)
    png = plot_png(name, records=services.log.records(job_id))
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=60"})


@router.get("/jobs/{job_id}/report")
def job_report_page(
    job_id: str,
    request: Request,
    services: ServicesDep,
    format: Annotated[str, Query(pattern="^(html|json)$")] = "html",
) -> Response:
    """The deployment report, exactly as GET /v1/jobs/{id}/report serves it."""
    session = require_session(request)
    return get_report(job_id, session.user_id, services, format=format)  # type: ignore[arg-type]


@router.get("/jobs/{job_id}/files")
def job_file(
    job_id: str,
    request: Request,
    services: ServicesDep,
    key: Annotated[str, Query(max_length=1024)],
) -> Response:
    """Download one of the job's artifacts (only keys the job's own listing names)."""
    session = require_session(request)
    job = owned_job(services, job_id, session.user_id)
    if key not in {a.key for a in job_artifacts(services, job, expires_s=60)}:
        raise NotFoundError(f"job {job_id} has no artifact {key!r}")
    name = key.rsplit("/", 1)[-1]
    media_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    headers = {
        "Content-Disposition": f'attachment; filename="{name}"',
        # An HTML or SVG artifact opened anyway must not run script on this origin.
        "Content-Security-Policy": "sandbox; default-src 'none'",
        "X-Content-Type-Options": "nosniff",
    }
    return Response(services.store.get_bytes(key), media_type=media_type, headers=headers)


# --- upload and submit -----------------------------------------------------------------------


def _profiles() -> list[dict[str, Any]]:
    from modules.core.profiles import BUILTIN_PROFILES

    return [profile.model_dump(mode="json") for profile in BUILTIN_PROFILES.values()]


def _upload_page(
    request: Request,
    session: Session,
    services: Services,
    *,
    error: str | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    from modules.storage.datasets import BUILTIN_DATASETS

    return page(
        request,
        "upload.html",
        {
            "error": error,
            "profiles": _profiles(),
            "datasets": list(BUILTIN_DATASETS),
            "models": list_model_metas(services.store, user_id=session.user_id)[:50],
        },
        session=session,
        status_code=status_code,
    )


@router.get("/upload")
def upload_page(request: Request, services: ServicesDep) -> HTMLResponse:
    """Upload a model and start a job from a profile and a preset pipeline."""
    session = require_session(request)
    return _upload_page(request, session, services)


def _check_choices(texts: dict[str, str], *, framework: str) -> None:
    """Refuse an unknown preset, profile or dataset before anything is stored."""
    from modules.core.profiles import BUILTIN_PROFILES
    from modules.storage.datasets import BUILTIN_DATASETS

    get_preset(texts.get("preset", ""), framework=framework)
    profile = texts.get("profile") or DEFAULT_PROFILE
    if profile not in BUILTIN_PROFILES:
        raise BadInputError(f"unknown profile {profile!r}; one of {', '.join(BUILTIN_PROFILES)}")
    dataset = texts.get("dataset") or "digits"
    if dataset not in BUILTIN_DATASETS:
        raise BadInputError(f"unknown dataset {dataset!r}; one of {', '.join(BUILTIN_DATASETS)}")


def _start_job(
    services: Services,
    dispatcher: Any,
    *,
    user: str,
    model_id: str,
    framework: str,
    texts: dict[str, str],
) -> str:
    _check_choices(texts, framework=framework)
    preset = get_preset(texts.get("preset", ""), framework=framework)
    try:
        body = JobCreate.model_validate(
            {
                "model_id": model_id,
                "dataset": texts.get("dataset") or "digits",
                "profile": texts.get("profile") or DEFAULT_PROFILE,
                "steps": preset.step_calls(),
            }
        )
    except ValidationError as exc:
        problems = "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
        raise BadInputError(problems) from None
    return create_job(body, user, services, dispatcher).id


@router.post("/upload")
async def upload_and_start(
    request: Request, services: ServicesDep, settings: SettingsDep, dispatcher: DispatcherDep
) -> Response:
    """Store the uploaded model (the API's safe loaders), start the preset, show the job."""
    session = require_session(request)
    try:
        form = await receive_upload_form(request, limit=settings.max_upload_bytes)
        if not csrf_ok(session, form.texts.get("csrf")):
            raise BadInputError("the form is out of date; reload the page and try again")
        upload = form.upload
        arch = form.texts.get("arch") or None
        artifact = await run_in_threadpool(validate_model_bytes, upload.data, upload.filename, arch)
        _check_choices(form.texts, framework=artifact.framework)
        meta = await run_in_threadpool(
            lambda: save_upload(
                services.store,
                user_id=session.user_id,
                filename=upload.filename,
                data=upload.data,
                artifact=artifact,
                arch=arch,
            )
        )
        job_id = await run_in_threadpool(
            lambda: _start_job(
                services,
                dispatcher,
                user=session.user_id,
                model_id=meta["id"],
                framework=artifact.framework,
                texts=form.texts,
            )
        )
    except McaasError as exc:
        return _upload_page(request, session, services, error=str(exc), status_code=status_for(exc))
    return RedirectResponse(f"/ui/jobs/{job_id}", status_code=303)


@router.post("/jobs")
def start_job(
    request: Request,
    services: ServicesDep,
    dispatcher: DispatcherDep,
    csrf: Annotated[str, Form(max_length=256)] = "",
    model_id: Annotated[str, Form(max_length=64)] = "",
    profile: Annotated[str, Form(max_length=64)] = DEFAULT_PROFILE,
    preset: Annotated[str, Form(max_length=64)] = "",
    dataset: Annotated[str, Form(max_length=64)] = "digits",
) -> Response:
    """Start a preset on a model uploaded before."""
    session = require_session(request)
    try:
        if not csrf_ok(session, csrf):
            raise BadInputError("the form is out of date; reload the page and try again")
        meta = get_model_meta(services.store, user_id=session.user_id, model_id=model_id)
        job_id = _start_job(
            services,
            dispatcher,
            user=session.user_id,
            model_id=meta["id"],
            framework=meta["framework"],
            texts={"profile": profile, "preset": preset, "dataset": dataset},
        )
    except McaasError as exc:
        return _upload_page(request, session, services, error=str(exc), status_code=status_for(exc))
    return RedirectResponse(f"/ui/jobs/{job_id}", status_code=303)


def _error_page(request: Request, session: Session, exc: McaasError) -> HTMLResponse:
    return page(
        request, "error.html", {"message": str(exc)}, session=session, status_code=status_for(exc)
    )


@router.get("/static/{name}")
def static_file(name: str) -> Response:
    """The dashboard's one stylesheet and one script (a fixed list, no paths)."""
    media_type = STATIC_FILES.get(name)
    if media_type is None:
        raise NotFoundError(f"no static file {name!r}")
    return Response(
        (STATIC_DIR / name).read_bytes(),
        media_type=media_type,
        headers={"Cache-Control": "public, max-age=300", "X-Content-Type-Options": "nosniff"},
    )
