"""Per-user limits and login throttling: over a limit is a 429 with Retry-After and a message
naming the limit (and the setting that sets it).

* Jobs: a new job is refused while the user has MCAAS_MAX_QUEUED_JOBS waiting (QUEUED), or
  MCAAS_MAX_CONCURRENT_JOBS running (INPROGRESS) with the queue allowance used up too. They
  are counted from the job store (the user's newest `SCAN_JOBS` jobs: an older job still
  active would be a lost one, which the staleness watchdog fails). The workers do not hold
  a user's queued job back; two submissions at the same instant may both pass: the limits
  stop floods, they are not exact to one job.
* Uploads: models and inputs files per user in any 60 s, and the bytes a user keeps in
  them (the upload's Content-Length counts before it is read).
* Dashboard login: failed logins per client address and per key tried, and logins per
  user, in any 60 s.

The windows live in this API process: with several API replicas each enforces its own.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Request

from modules.core.records import JobStatus
from modules.errors import McaasError
from modules.pipeline.settings import Services, Settings
from modules.storage.inputs_catalog import list_inputs_metas
from modules.storage.model_catalog import list_model_metas

WINDOW_S = 60.0
# How many of a user's newest jobs are looked at to count the active ones.
SCAN_JOBS = 500
# A user over a job limit is told to come back after this long (jobs take minutes).
JOB_RETRY_AFTER_S = 30
# Stored bytes do not free themselves soon: artifacts expire with the bucket's lifecycle.
STORAGE_RETRY_AFTER_S = 3600
# Distinct keys (users, addresses) a window remembers; the oldest are forgotten first.
MAX_TRACKED_KEYS = 100_000


class QuotaExceededError(McaasError):
    """A per-user limit or a throttle was hit (HTTP 429, with Retry-After)."""

    code = "quota_exceeded"

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = max(1, math.ceil(retry_after_s))


class SlidingWindow:
    """At most `limit` events per key in any `window_s` seconds (thread-safe)."""

    def __init__(
        self,
        limit: int,
        *,
        window_s: float = WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = MAX_TRACKED_KEYS,
    ) -> None:
        self.limit, self.window_s, self.clock, self.max_keys = limit, window_s, clock, max_keys
        self._events: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> deque[float]:
        events = self._events.get(key)
        if events is None:
            events = self._events[key] = deque()
            while len(self._events) > self.max_keys:
                self._events.popitem(last=False)
        self._events.move_to_end(key)
        while events and events[0] <= now - self.window_s:
            events.popleft()
        return events

    def retry_after(self, key: str) -> float | None:
        """Seconds until `key` may have another event, or None when it may now."""
        with self._lock:
            now = self.clock()
            events = self._recent(key, now)
            if len(events) < self.limit:
                return None
            return events[0] + self.window_s - now

    def hit(self, key: str) -> float | None:
        """Count one event for `key` unless it is over the limit; then return the seconds
        until it may have another (and count nothing)."""
        with self._lock:
            now = self.clock()
            events = self._recent(key, now)
            if len(events) >= self.limit:
                return events[0] + self.window_s - now
            events.append(now)
            return None


class ApiLimits:
    """The limits of one API process, built once from Settings at start-up."""

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.uploads = SlidingWindow(settings.uploads_per_minute, clock=clock)
        attempts = settings.login_attempts_per_minute
        self.failed_logins_by_address = SlidingWindow(2 * attempts, clock=clock)
        self.failed_logins_by_key = SlidingWindow(attempts, clock=clock)
        self.logins_by_user = SlidingWindow(attempts, clock=clock)

    # --- jobs ---------------------------------------------------------------------------------

    def check_jobs(self, services: Services, user: str) -> None:
        """Refuse a new job when the user already has too many running or waiting."""
        running = queued = 0
        seen, cursor = 0, None
        while seen < SCAN_JOBS:
            page, cursor = services.jobs.list(user, limit=100, cursor=cursor)
            seen += len(page)
            running += sum(job.status == JobStatus.INPROGRESS for job in page)
            queued += sum(job.status == JobStatus.QUEUED for job in page)
            if cursor is None:
                break
        s = self.settings
        if running >= s.max_concurrent_jobs and running + queued >= (
            s.max_concurrent_jobs + s.max_queued_jobs
        ):
            raise QuotaExceededError(
                f"limit of {s.max_concurrent_jobs} running jobs per user reached "
                f"(MCAAS_MAX_CONCURRENT_JOBS; {queued} more queued): wait for one to finish "
                "or stop one",
                retry_after_s=JOB_RETRY_AFTER_S,
            )
        if queued >= s.max_queued_jobs:
            raise QuotaExceededError(
                f"limit of {s.max_queued_jobs} queued jobs per user reached "
                f"(MCAAS_MAX_QUEUED_JOBS; {running} running): wait for them to start",
                retry_after_s=JOB_RETRY_AFTER_S,
            )

    # --- uploads ------------------------------------------------------------------------------

    def check_upload(self, services: Services, user: str, *, declared_bytes: int | None) -> None:
        """Refuse an upload past the per-minute rate or the bytes the user may keep."""
        cap = int(self.settings.max_stored_mb * 2**20)
        stored = sum(
            int(m.get("size") or 0) for m in list_model_metas(services.store, user_id=user)
        )
        stored += sum(
            int(m.get("size") or 0) for m in list_inputs_metas(services.store, user_id=user)
        )
        if stored + (declared_bytes or 0) > cap:
            raise QuotaExceededError(
                f"storage limit of {self.settings.max_stored_mb:g} MB per user reached "
                f"(MCAAS_MAX_STORED_MB): {stored / 2**20:.1f} MB stored in models and inputs",
                retry_after_s=STORAGE_RETRY_AFTER_S,
            )
        wait = self.uploads.hit(user)
        if wait is not None:
            raise QuotaExceededError(
                f"limit of {self.settings.uploads_per_minute} uploads per minute per user "
                f"reached (MCAAS_UPLOADS_PER_MINUTE): try again in {math.ceil(wait)} s",
                retry_after_s=wait,
            )

    # --- dashboard login ----------------------------------------------------------------------

    def login_blocked(self, *, address: str, api_key: str) -> QuotaExceededError | None:
        """The refusal for a login attempt from `address` with `api_key`, if it is throttled."""
        attempts = self.settings.login_attempts_per_minute
        wait = self.failed_logins_by_address.retry_after(address)
        if wait is not None:
            return QuotaExceededError(
                f"too many failed logins from this address ({2 * attempts} per minute, "
                f"MCAAS_LOGIN_ATTEMPTS_PER_MINUTE): try again in {math.ceil(wait)} s",
                retry_after_s=wait,
            )
        wait = self.failed_logins_by_key.retry_after(_fingerprint(api_key))
        if wait is not None:
            return QuotaExceededError(
                f"too many failed logins with this key ({attempts} per minute, "
                f"MCAAS_LOGIN_ATTEMPTS_PER_MINUTE): try again in {math.ceil(wait)} s",
                retry_after_s=wait,
            )
        return None

    def login_failed(self, *, address: str, api_key: str) -> None:
        self.failed_logins_by_address.hit(address)
        self.failed_logins_by_key.hit(_fingerprint(api_key))

    def login_succeeded(self, user: str) -> QuotaExceededError | None:
        """Count a login of `user`; the refusal when they log in too often."""
        wait = self.logins_by_user.hit(user)
        if wait is None:
            return None
        return QuotaExceededError(
            f"too many logins for this user ({self.settings.login_attempts_per_minute} per "
            f"minute, MCAAS_LOGIN_ATTEMPTS_PER_MINUTE): try again in {math.ceil(wait)} s",
            retry_after_s=wait,
        )


def _fingerprint(api_key: str) -> str:
    # Never keep a tried key itself in memory, valid or not.
    return hashlib.sha256(api_key.encode("utf-8", "replace")).hexdigest()[:32]


def get_limits(request: Request) -> ApiLimits:
    """The limits built at start-up."""
    limits: ApiLimits = request.app.state.limits
    return limits


LimitsDep = Annotated[ApiLimits, Depends(get_limits)]


def declared_length(request: Request) -> int | None:
    """The request's Content-Length, when it sent a valid one."""
    value = request.headers.get("content-length")
    return int(value) if value is not None and value.isdigit() else None
