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
from api.quotas import ApiLimits, QuotaExceededError, declared_length, get_limits
from api.routes.events import job_event, step_states
from api.routes.jobs import REPORT_CSP, create_job, get_report, job_artifacts, owned_job
from api.schemas import JobCreate
from api.ui.forms import (
    GOAL_FIELDS,
    InvalidFormError,
    form_errors,
    goal_from_form,
    goal_inputs,
    is_goal_preset,
    receive_upload_form,
)
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
from api.ui.views import compress_outcome, job_headline, step_rows
from modules.core.jobspec import DEFAULT_PROFILE
from modules.core.records import JobRecord
from modules.errors import BadInputError, McaasError, NotFoundError
from modules.pipeline.presets import PRESETS, get_preset
from modules.pipeline.settings import Services
from modules.storage.keys import key_in_user
from modules.storage.model_catalog import (
    get_model_meta,
    list_model_metas,
    save_upload,
    validate_model_bytes,
)

HERE = Path(__file__).resolve().parent
TEMPLATES_DIR = HERE.parent / "templates"
STATIC_DIR = HERE / "static"
STATIC_FILES = {
    "dashboard.css": "text/css",
    "job.js": "text/javascript",
    "upload.js": "text/javascript",
}

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
    limits = get_limits(request)
    address = request.client.host if request.client is not None else "unknown"
    refused = limits.login_blocked(address=address, api_key=api_key)
    if refused is not None:
        return _throttled_login(request, next, refused)
    user = request.app.state.keys.user_for(api_key) if api_key else None
    if user is None:
        limits.login_failed(address=address, api_key=api_key)
        return page(
            request,
            "login.html",
            {"next": _safe_next(next), "error": "That API key is not valid.", "enabled": True},
            status_code=401,
        )
    refused = limits.login_succeeded(user)
    if refused is not None:
        return _throttled_login(request, next, refused)
    response = RedirectResponse(_safe_next(next), status_code=303)
    set_session_cookie(
        response, new_session(user), secret=secret, secure=request.url.scheme == "https"
    )
    return response


def _throttled_login(request: Request, next: str, refused: QuotaExceededError) -> HTMLResponse:
    """The login form again, with the throttle's message, as a 429 with Retry-After."""
    response = page(
        request,
        "login.html",
        {"next": _safe_next(next), "error": f"Too many login attempts: {refused}", "enabled": True},
        status_code=429,
    )
    response.headers["Retry-After"] = str(refused.retry_after_s)
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
        "compress": compress_outcome(records, artifacts),
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


@router.get("/jobs/{job_id}/steps/{index}/report")
def step_report_page(job_id: str, index: int, request: Request, services: ServicesDep) -> Response:
    """One step's own report.html (a compress search's), opened in the browser like the
    deployment report: same sandboxing CSP, only a key that step's record names."""
    session = require_session(request)
    owned_job(services, job_id, session.user_id)
    record = next((r for r in services.log.records(job_id) if r.index == index), None)
    key = None if record is None else record.files.get("report.html")
    if key is None or not key_in_user(key, session.user_id):
        raise NotFoundError(f"step {index} of job {job_id} wrote no report.html")
    return HTMLResponse(
        services.store.get_bytes(key), headers={"Content-Security-Policy": REPORT_CSP}
    )


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
    error: McaasError | None = None,
    submitted: tuple[str, dict[str, str]] | None = None,
) -> HTMLResponse:
    """The upload page; after a refused submit, with its error (field by field where the
    fields are known) and the values the user gave, in the form that sent them."""
    from modules.storage.datasets import BUILTIN_DATASETS

    goal_presets = [p.name for p in PRESETS.values() if is_goal_preset(p)]
    form, values = submitted or ("", {})
    fields = error.fields if isinstance(error, InvalidFormError) else {}
    return page(
        request,
        "upload.html",
        {
            # The banner sums up what each field says beside it (one place to look first).
            "error": None if error is None else _banner(error, fields),
            "field_errors": fields,
            "form": form,
            "values": {k: v for k, v in values.items() if k != "csrf"},
            "goal_presets": goal_presets,
            "goal_inputs": goal_inputs(PRESETS[goal_presets[0]] if goal_presets else None),
            "profiles": _profiles(),
            "datasets": list(BUILTIN_DATASETS),
            "models": list_model_metas(services.store, user_id=session.user_id)[:50],
        },
        session=session,
        status_code=200 if error is None else status_for(error),
    )


def _banner(error: McaasError, fields: dict[str, str]) -> str:
    if fields:
        return f"Check the form: {'; '.join(fields.values())}."
    return str(error)


@router.get("/upload")
def upload_page(request: Request, services: ServicesDep) -> HTMLResponse:
    """Upload a model and start a job from a profile and a preset pipeline."""
    session = require_session(request)
    return _upload_page(request, session, services)


def _check_choices(texts: dict[str, str], *, framework: str) -> None:
    """Refuse an unknown preset, profile or dataset before anything is stored."""
    from modules.core.profiles import BUILTIN_PROFILES
    from modules.storage.datasets import BUILTIN_DATASETS

    preset = get_preset(texts.get("preset", ""), framework=framework)
    profile = texts.get("profile") or DEFAULT_PROFILE
    # A goal's profile is checked (and named goal.profile) with the rest of the goal.
    if not is_goal_preset(preset) and profile not in BUILTIN_PROFILES:
        raise BadInputError(f"unknown profile {profile!r}; one of {', '.join(BUILTIN_PROFILES)}")
    dataset = texts.get("dataset") or "digits"
    if dataset not in BUILTIN_DATASETS:
        raise BadInputError(f"unknown dataset {dataset!r}; one of {', '.join(BUILTIN_DATASETS)}")


def _job_body(texts: dict[str, str], *, framework: str, model_id: str | None) -> JobCreate:
    """The job the form asks for, validated as POST /v1/jobs validates its body: a preset's
    steps, or for compress-to-budget a `goal` built from the form's goal fields."""
    _check_choices(texts, framework=framework)
    preset = get_preset(texts.get("preset", ""), framework=framework)
    body: dict[str, Any] = {"model_id": model_id, "dataset": texts.get("dataset") or "digits"}
    if is_goal_preset(preset):
        body["goal"] = goal_from_form(preset, texts)
    else:
        body["profile"] = texts.get("profile") or DEFAULT_PROFILE
        body["steps"] = preset.step_calls()
    try:
        return JobCreate.model_validate(body)
    except ValidationError as exc:
        raise form_errors(exc) from None


def _start_job(
    services: Services,
    dispatcher: Any,
    *,
    limits: ApiLimits,
    user: str,
    model_id: str,
    framework: str,
    texts: dict[str, str],
) -> str:
    body = _job_body(texts, framework=framework, model_id=model_id)
    return create_job(body, user, services, dispatcher, limits).id


@router.post("/upload")
async def upload_and_start(
    request: Request, services: ServicesDep, settings: SettingsDep, dispatcher: DispatcherDep
) -> Response:
    """Store the uploaded model (the API's safe loaders), start the preset, show the job."""
    session = require_session(request)
    limits = get_limits(request)
    form = None
    try:
        # Both limits before anything is read or stored: a refused job leaves no upload.
        await run_in_threadpool(limits.check_jobs, services, session.user_id)
        await run_in_threadpool(
            limits.check_upload,
            services,
            session.user_id,
            declared_bytes=declared_length(request),
        )
        form = await receive_upload_form(request, limit=settings.max_upload_bytes)
        if not csrf_ok(session, form.texts.get("csrf")):
            raise BadInputError("the form is out of date; reload the page and try again")
        upload = form.upload
        arch = form.texts.get("arch") or None
        artifact = await run_in_threadpool(validate_model_bytes, upload.data, upload.filename, arch)
        # The whole job is validated before the upload is stored: a refused form stores nothing.
        _job_body(form.texts, framework=artifact.framework, model_id=None)
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
                limits=limits,
                user=session.user_id,
                model_id=meta["id"],
                framework=artifact.framework,
                texts=form.texts,
            )
        )
    except McaasError as exc:
        texts = form.texts if form is not None else {}
        return _upload_page(request, session, services, error=exc, submitted=("new", texts))
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
    max_drop: Annotated[str, Form(max_length=64)] = "",
    drop_kind: Annotated[str, Form(max_length=64)] = "",
    objective: Annotated[str, Form(max_length=64)] = "",
    max_time_s: Annotated[str, Form(max_length=64)] = "",
) -> Response:
    """Start a preset on a model uploaded before."""
    session = require_session(request)
    goal = dict(zip(GOAL_FIELDS, (max_drop, drop_kind, objective, max_time_s), strict=True))
    texts = {"model_id": model_id, "profile": profile, "preset": preset, "dataset": dataset}
    texts.update(goal)
    try:
        if not csrf_ok(session, csrf):
            raise BadInputError("the form is out of date; reload the page and try again")
        meta = get_model_meta(services.store, user_id=session.user_id, model_id=model_id)
        job_id = _start_job(
            services,
            dispatcher,
            limits=get_limits(request),
            user=session.user_id,
            model_id=meta["id"],
            framework=meta["framework"],
            texts=texts,
        )
    except McaasError as exc:
        return _upload_page(request, session, services, error=exc, submitted=("old", texts))
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
