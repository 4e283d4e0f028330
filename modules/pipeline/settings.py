"""Service settings: one pydantic-settings class read from the environment, once per process.

The API, the Celery worker and the ECS entrypoint (which per-technique scripts also reach)
all read these, so they live here rather than in `api/` or `workers/`. Environment names
are prefix-free and upper-case, matching the ECS env-var contract (MODEL_BUCKET, REDIS_URL).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from modules.errors import McaasError
from modules.storage.artifacts import ArtifactStore, S3Store, make_store
from modules.storage.jobs import DynamoJobStore, JobStore, SqliteJobStore
from modules.storage.keys import validate_user_id
from modules.storage.steplog import DynamoStepLog, SqliteStepLog, StepLog, TeeStepLog
from modules.storage.ttl import MAX_TTL_DAYS

Role = Literal["api", "worker", "ecs"]
DEV_SESSION_SECRET = b"mcaas-dev-only-session-secret-not-for-production"


class SettingsError(McaasError):
    """A setting is missing or invalid; the message names the environment variable."""

    code = "settings"


def _env(name: str, **kwargs: Any) -> Any:
    # validation_alias makes pydantic name the env variable (not the attribute) in errors.
    return Field(validation_alias=AliasChoices(name, name.lower()), **kwargs)


class Settings(BaseSettings):
    """Every knob of the service; required values have no default."""

    model_config = SettingsConfigDict(
        case_sensitive=False, extra="ignore", frozen=True, populate_by_name=True
    )

    store_url: str | None = _env(
        "MCAAS_STORE_URL",
        default=None,
        description="Artifact store: s3://bucket or a local directory. Defaults to MODEL_BUCKET.",
    )
    model_bucket: str | None = _env(
        "MODEL_BUCKET", default=None, description="S3 bucket for models (the ECS contract)."
    )
    jobs_table: str | None = _env(
        "MCAAS_JOBS_TABLE", default=None, description="DynamoDB table of job records."
    )
    jobs_db: Path | None = _env(
        "MCAAS_JOBS_DB", default=None, description="SQLite file of job records (embedded mode)."
    )
    steps_table: str | None = _env(
        "MCAAS_STEPS_TABLE", default=None, description="DynamoDB table of step records."
    )
    step_log: Literal["dynamodb", "csv", "dynamodb+csv"] = _env(
        "MCAAS_STEP_LOG", default="csv", description="Where step records go."
    )
    record_ttl_days: int = _env(
        "MCAAS_RECORD_TTL_DAYS",
        default=0,
        ge=0,
        le=MAX_TTL_DAYS,
        description=(
            "Job and step records in DynamoDB expire this many days after they are written "
            "(the tables' TTL on expires_at); 0 keeps them."
        ),
    )
    csv_log: Path | None = _env(
        "MCAAS_CSV_LOG",
        default=None,
        description=(
            "CSV export of the step records; the records themselves are kept in an SQLite "
            "file beside it (same name, .sqlite)."
        ),
    )
    redis_url: str | None = _env(
        "REDIS_URL", default=None, description="Celery broker, e.g. redis://redis:6379/0."
    )
    dispatcher: Literal["celery", "ecs", "inline"] = _env(
        "MCAAS_DISPATCHER", default="inline", description="How job steps are run."
    )
    queue: str = _env(
        "MCAAS_QUEUE",
        default="mcaas.steps",
        pattern=r"^[A-Za-z0-9._-]{1,64}$",
        description="Celery queue that carries step tasks.",
    )
    api_keys: SecretStr | None = _env(
        "MCAAS_API_KEYS", default=None, description="API keys as 'key1:alice,key2:bob'."
    )
    api_keys_table: str | None = _env(
        "MCAAS_API_KEYS_TABLE",
        default=None,
        description="DynamoDB table mapping sha256(key) -> user_id.",
    )
    max_upload_mb: float = _env(
        "MCAAS_MAX_UPLOAD_MB", default=100.0, gt=0, le=10_240, description="Upload size cap."
    )
    dev_mode: bool = _env(
        "MCAAS_DEV_MODE",
        default=False,
        description="Create the bucket and tables on start-up (dev and tests only).",
    )
    trust_pickle: bool = _env(
        "MCAAS_TRUST_PICKLE",
        default=False,
        description="Workers may load full pickled torch modules from the store. Never uploads.",
    )
    task_soft_time_limit_s: int = _env(
        "MCAAS_TASK_SOFT_TIME_LIMIT_S",
        default=1800,
        ge=1,
        le=86_400,
        description="Soft limit of one step task.",
    )
    task_time_limit_s: int = _env(
        "MCAAS_TASK_TIME_LIMIT_S",
        default=1900,
        ge=2,
        le=86_400,
        description="Hard limit of one step task (the worker child is killed).",
    )
    visibility_timeout_s: int = _env(
        "MCAAS_VISIBILITY_TIMEOUT_S",
        default=3600,
        ge=3,
        le=7 * 86_400,
        description="Redis redelivers an unacked task after this long.",
    )
    task_max_retries: int = _env(
        "MCAAS_TASK_MAX_RETRIES",
        default=5,
        ge=0,
        le=50,
        description="Retries of a step after transient S3/DynamoDB/Redis errors.",
    )
    max_redeliveries: int = _env(
        "MCAAS_MAX_REDELIVERIES",
        default=3,
        ge=0,
        le=100,
        description=(
            "How many times a job's steps may be started again after their worker died (a "
            "crash, the OOM killer, a lost pool process); past this the job FAILS with the "
            "reason instead of being delivered again. Counted from the job's attempts."
        ),
    )
    worker_memory_limit_mb: int = _env(
        "MCAAS_WORKER_MEMORY_LIMIT_MB",
        default=0,
        ge=0,
        le=1_048_576,
        description=(
            "Address-space cap (RLIMIT_AS) of each worker pool process, so a step that "
            "allocates past it gets a MemoryError and its job FAILS while the worker lives "
            "on. 0: derived from the container's cgroup memory limit (memory.max) shared "
            "among the pool processes, or no cap outside a memory-limited cgroup."
        ),
    )
    max_concurrent_jobs: int = _env(
        "MCAAS_MAX_CONCURRENT_JOBS",
        default=2,
        ge=1,
        le=10_000,
        description="Jobs one user may have running (INPROGRESS) at once; more is a 429.",
    )
    max_queued_jobs: int = _env(
        "MCAAS_MAX_QUEUED_JOBS",
        default=10,
        ge=1,
        le=100_000,
        description="Jobs one user may have waiting (QUEUED) at once; more is a 429.",
    )
    uploads_per_minute: int = _env(
        "MCAAS_UPLOADS_PER_MINUTE",
        default=30,
        ge=1,
        le=100_000,
        description="Model and inputs uploads one user may make in any 60 s; more is a 429.",
    )
    max_stored_mb: float = _env(
        "MCAAS_MAX_STORED_MB",
        default=5_120.0,
        gt=0,
        le=10_485_760,
        description=(
            "Bytes one user may keep in uploaded models and inputs (MB); an upload past it "
            "is a 429 naming the limit."
        ),
    )
    login_attempts_per_minute: int = _env(
        "MCAAS_LOGIN_ATTEMPTS_PER_MINUTE",
        default=10,
        ge=1,
        le=10_000,
        description=(
            "Failed dashboard logins allowed in any 60 s for one user name, and (twice as "
            "many) for one client address; past them logins get a 429 until the window moves."
        ),
    )
    continue_inline_s: float = _env(
        "MCAAS_CONTINUE_INLINE_S",
        default=60.0,
        ge=0,
        le=86_400,
        description=(
            "A Celery task runs its job's next step itself, without a broker hand-off, while "
            "it has run for less than this many seconds; 0 queues every step as its own task."
        ),
    )
    worker_cache_mb: int = _env(
        "MCAAS_WORKER_CACHE_MB",
        default=256,
        ge=0,
        le=65_536,
        description=(
            "Model bytes each worker pool process keeps for the next step of a job it ran "
            "(modules/pipeline/step_cache.py); 0 turns the step cache off."
        ),
    )
    presign_expires_s: int = _env(
        "MCAAS_PRESIGN_EXPIRES_S",
        default=3600,
        ge=60,
        le=7 * 86_400,
        description="Lifetime of presigned artifact URLs.",
    )
    ecs_cluster: str | None = _env("MCAAS_ECS_CLUSTER", default=None, description="ECS cluster.")
    ecs_task_definition: str | None = _env(
        "MCAAS_ECS_TASK_DEFINITION", default=None, description="ECS task definition (family:rev)."
    )
    ecs_container: str = _env(
        "MCAAS_ECS_CONTAINER", default="worker", description="Container that gets the env."
    )
    ecs_subnets: str | None = _env(
        "MCAAS_ECS_SUBNETS", default=None, description="Comma-separated subnet ids."
    )
    ecs_security_groups: str | None = _env(
        "MCAAS_ECS_SECURITY_GROUPS", default=None, description="Comma-separated group ids."
    )
    ecs_launch_type: Literal["FARGATE", "EC2"] = _env(
        "MCAAS_ECS_LAUNCH_TYPE", default="FARGATE", description="ECS launch type."
    )
    aws_region: str = _env(
        "AWS_DEFAULT_REGION", default="us-east-1", description="AWS region for every client."
    )
    aws_endpoint_url: str | None = _env(
        "AWS_ENDPOINT_URL",
        default=None,
        description="S3/DynamoDB/ECS endpoint (moto in dev); boto3 reads it itself.",
    )
    session_secret: SecretStr | None = _env(
        "MCAAS_SESSION_SECRET",
        default=None,
        min_length=32,
        description="Signs the dashboard's login cookie (32+ characters). Dev mode has a default.",
    )

    @field_validator("store_url", "model_bucket", "jobs_table", "steps_table", "api_keys_table")
    @classmethod
    def _blank_is_unset(cls, value: str | None) -> str | None:
        return value or None

    @field_validator("api_keys")
    @classmethod
    def _parse_keys(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and value.get_secret_value():
            parse_api_keys(value.get_secret_value())
        return value

    @property
    def artifact_store_url(self) -> str | None:
        """MCAAS_STORE_URL, or s3://MODEL_BUCKET when only the bucket is set."""
        if self.store_url:
            return self.store_url
        return f"s3://{self.model_bucket}" if self.model_bucket else None

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def ui_session_secret(self) -> bytes | None:
        """The dashboard's cookie-signing key; a fixed one only in dev mode, else None (UI off)."""
        if self.session_secret is not None:
            return self.session_secret.get_secret_value().encode("utf-8")
        # A known key signs forgeable cookies: acceptable for dev and tests, never elsewhere.
        return DEV_SESSION_SECRET if self.dev_mode else None

    def api_key_map(self) -> dict[str, str]:
        """The MCAAS_API_KEYS pairs as {key: user_id}."""
        if self.api_keys is None:
            return {}
        return parse_api_keys(self.api_keys.get_secret_value())

    def missing(self, role: Role) -> list[str]:
        """The settings `role` ("api", "worker" or "ecs") needs but does not have."""
        out: list[str] = []
        if role != "ecs" and self.artifact_store_url is None:
            out.append("MCAAS_STORE_URL (or MODEL_BUCKET)")
        if role != "ecs" and self.jobs_table is None and self.jobs_db is None:
            out.append("MCAAS_JOBS_TABLE (or MCAAS_JOBS_DB)")
        if "dynamodb" in self.step_log and self.steps_table is None:
            out.append(f"MCAAS_STEPS_TABLE (MCAAS_STEP_LOG={self.step_log})")
        if "csv" in self.step_log and self.csv_log is None:
            out.append(f"MCAAS_CSV_LOG (MCAAS_STEP_LOG={self.step_log})")
        if role == "api" and self.api_keys is None and self.api_keys_table is None:
            out.append("MCAAS_API_KEYS (or MCAAS_API_KEYS_TABLE)")
        if role != "ecs" and self.dispatcher == "celery" and not self.redis_url:
            out.append("REDIS_URL (MCAAS_DISPATCHER=celery)")
        if self.dispatcher == "ecs" and role != "ecs":
            for name, value in (
                ("MCAAS_ECS_CLUSTER", self.ecs_cluster),
                ("MCAAS_ECS_TASK_DEFINITION", self.ecs_task_definition),
                ("MCAAS_ECS_SUBNETS", self.ecs_subnets),
                ("MCAAS_ECS_SECURITY_GROUPS", self.ecs_security_groups),
            ):
                if not value:
                    out.append(f"{name} (MCAAS_DISPATCHER=ecs)")
        if self.task_soft_time_limit_s >= self.task_time_limit_s:
            out.append("MCAAS_TASK_SOFT_TIME_LIMIT_S below MCAAS_TASK_TIME_LIMIT_S")
        if self.continue_inline_s >= self.task_soft_time_limit_s:
            # A step begun late in a task has only the rest of the task's time limits.
            out.append("MCAAS_CONTINUE_INLINE_S below MCAAS_TASK_SOFT_TIME_LIMIT_S")
        if self.visibility_timeout_s <= self.task_time_limit_s:
            # Otherwise Redis hands a still-running long step to a second worker.
            out.append("MCAAS_VISIBILITY_TIMEOUT_S above MCAAS_TASK_TIME_LIMIT_S")
        return out

    def require(self, role: Role) -> Settings:
        """Return self, or raise SettingsError naming every missing setting for `role`."""
        missing = self.missing(role)
        if missing:
            raise SettingsError(f"{role} cannot start; set " + "; ".join(missing))
        return self


# Attribute name -> environment variable, so errors name what the operator sets.
ENV_NAMES: dict[str, str] = {
    name: str(field.validation_alias.choices[0])  # type: ignore[union-attr]
    for name, field in Settings.model_fields.items()
}


def parse_api_keys(text: str) -> dict[str, str]:
    """Parse 'key1:alice,key2:bob' into {key: user_id}; errors never echo a key."""
    out: dict[str, str] = {}
    for position, pair in enumerate(filter(None, (p.strip() for p in text.split(","))), start=1):
        key, sep, user = pair.partition(":")
        if not sep or len(key) < 8:
            raise ValueError(
                f"MCAAS_API_KEYS entry {position} must be 'key:user_id' with a key of 8+ characters"
            )
        validate_user_id(user)
        if key in out:
            raise ValueError(f"MCAAS_API_KEYS entry {position} repeats a key")
        out[key] = user
    return out


def load_settings(**overrides: Any) -> Settings:
    """Read Settings from the environment (plus overrides); SettingsError names bad variables."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else ""
            name = ENV_NAMES.get(field, field.upper() or "(settings)")
            problems.append(f"{name}: {err['msg'].removeprefix('Value error, ')}")
        raise SettingsError("invalid settings: " + "; ".join(problems)) from None


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's Settings, read once from the environment."""
    return load_settings()


def restore_interval_s(settings: Settings) -> int:
    """How often a worker looks for steps whose worker died (past the visibility timeout)."""
    return max(1, min(60, settings.visibility_timeout_s // 10))


def stale_after_s(settings: Settings) -> float:
    """How long a queued or running job may go without an update before it counts as lost.

    A running step updates the job when it starts and ends within the hard time limit; a
    step whose worker died is redelivered after the visibility timeout plus one restore
    sweep. Past both (with a second sweep as margin) no task is coming for the job.
    """
    longest = max(settings.visibility_timeout_s, settings.task_time_limit_s)
    return float(longest + 2 * restore_interval_s(settings))


class Services(NamedTuple):
    """The three stores a job needs."""

    store: ArtifactStore
    log: StepLog
    jobs: JobStore


def build_store(settings: Settings) -> ArtifactStore:
    """The artifact store named by MCAAS_STORE_URL or MODEL_BUCKET."""
    url = settings.artifact_store_url
    if url is None:
        raise SettingsError("set MCAAS_STORE_URL (or MODEL_BUCKET)")
    store = make_store(url)
    if isinstance(store, S3Store):
        store.region = settings.aws_region
    return store


def steps_db_path(csv_log: Path) -> Path:
    """The SQLite step log kept beside a CSV export: steps.csv -> steps.sqlite."""
    return csv_log.with_suffix(".sqlite")


def build_step_log(settings: Settings, *, store: ArtifactStore | None) -> StepLog:
    """DynamoDB, SQLite with its CSV export, or both (DynamoDB is then the one read back)."""
    logs: list[StepLog] = []
    if "dynamodb" in settings.step_log:
        if settings.steps_table is None:
            raise SettingsError(f"set MCAAS_STEPS_TABLE (MCAAS_STEP_LOG={settings.step_log})")
        logs.append(
            DynamoStepLog(
                settings.steps_table,
                overflow_store=store,
                region=settings.aws_region,
                ttl_days=settings.record_ttl_days,
            )
        )
    if "csv" in settings.step_log:
        if settings.csv_log is None:
            raise SettingsError(f"set MCAAS_CSV_LOG (MCAAS_STEP_LOG={settings.step_log})")
        logs.append(SqliteStepLog(steps_db_path(settings.csv_log), csv_export=settings.csv_log))
    return logs[0] if len(logs) == 1 else TeeStepLog(logs[0], *logs[1:])


def build_job_store(settings: Settings) -> JobStore:
    """DynamoDB when MCAAS_JOBS_TABLE is set, else SQLite at MCAAS_JOBS_DB."""
    if settings.jobs_table:
        return DynamoJobStore(
            settings.jobs_table, region=settings.aws_region, ttl_days=settings.record_ttl_days
        )
    if settings.jobs_db is not None:
        return SqliteJobStore(settings.jobs_db)
    raise SettingsError("set MCAAS_JOBS_TABLE (or MCAAS_JOBS_DB)")


def build_services(settings: Settings) -> Services:
    """The store, step log and job store the settings describe (no network I/O)."""
    store = build_store(settings)
    return Services(store, build_step_log(settings, store=store), build_job_store(settings))


def create_step_log_tables(log: StepLog) -> None:
    """Create the DynamoDB table(s) behind a step log if missing (dev mode only)."""
    parts = [log.primary, *log.others] if isinstance(log, TeeStepLog) else [log]
    for part in parts:
        if isinstance(part, DynamoStepLog):
            part.ensure_table()


def create_dev_resources(services: Services) -> None:
    """Create the bucket and tables if missing; call only when MCAAS_DEV_MODE is on."""
    if isinstance(services.store, S3Store):
        services.store.ensure_bucket()
    create_step_log_tables(services.log)
    if isinstance(services.jobs, DynamoJobStore):
        services.jobs.ensure_table()
