"""What a worker process holds across its tasks: its services and its step cache.

Both are built on first use and cleared after each fork (workers/celery_app.py), so no
boto3 client, SQLite connection or cached byte is shared between pool processes.
"""

from __future__ import annotations

import functools

from modules.pipeline.settings import Services, build_services, get_settings
from modules.pipeline.step_cache import StepCache


@functools.lru_cache(maxsize=1)
def worker_services() -> Services:
    """This worker process's store, step log and job store (rebuilt after each fork)."""
    return build_services(get_settings().require("worker"))


@functools.lru_cache(maxsize=1)
def worker_step_cache() -> StepCache | None:
    """The records and model bytes this pool process has seen (empty after each fork);
    None when MCAAS_WORKER_CACHE_MB is 0."""
    megabytes = get_settings().worker_cache_mb
    return StepCache(max_bytes=megabytes * 2**20) if megabytes else None
