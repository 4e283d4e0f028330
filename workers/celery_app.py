"""The Celery app on Redis, configured for long, idempotent step tasks.

`celery -A workers.celery_app worker` loads this module; the configuration is read from
Settings when Celery first needs it (not at import), so importing it costs no settings.

Why each option (see DESIGN.md's reliability notes):
* acks_late + reject_on_worker_lost: a step whose worker dies is redelivered, which is
  safe because run_step writes each output key and record once.
* prefetch multiplier 1: a worker holds one step at a time; long steps do not starve others.
* soft < hard time limit, and the Redis visibility_timeout above the hard limit, or
  Redis would hand a still-running step to a second worker. A step whose whole worker
  died comes back after the visibility timeout (plus one restore sweep).
* JSON only: tasks carry ids, never objects or pickles.
* Each pool process gets an address-space cap and its share of the cores
  (workers/process_limits.py); a pool process still bloated after a task (resident memory
  above half its cap) is replaced by a fresh one.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import worker_init, worker_process_init
from kombu import Queue

from modules.pipeline.settings import Settings, get_settings, restore_interval_s
from workers.names import TASK_NAME
from workers.process_limits import (
    PoolShape,
    apply_memory_cap,
    cgroup_memory_bytes,
    export_pool_shape,
    memory_cap_bytes,
    pool_shape,
    set_timing_threads,
)
from workers.services import worker_services, worker_step_cache

__all__ = ["celery_app", "celery_config", "make_celery", "restore_interval_s"]


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings derived from ours."""
    return {
        "broker_url": settings.redis_url,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout_s,
            # Sweep for abandoned (unacked, past the timeout) steps every tenth of the
            # timeout, at most once a minute; kombu's default is every 100 s.
            "unacked_restore_interval": restore_interval_s(settings),
            "unacked_restore_throttle": 1,
        },
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "task_ignore_result": True,
        "result_backend": None,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_soft_time_limit": settings.task_soft_time_limit_s,
        "task_time_limit": settings.task_time_limit_s,
        "task_queues": (Queue(settings.queue, routing_key=settings.queue),),
        "task_default_queue": settings.queue,
        "task_routes": {TASK_NAME: {"queue": settings.queue}},
        "task_create_missing_queues": False,
        # Events let flower show tasks; they cost one small message per state change.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
    }


def make_celery(settings: Settings, *, include_tasks: bool = False) -> Celery:
    """A Celery app for `settings` (the API uses one to send tasks by name)."""
    app = Celery("mcaas", include=["workers.tasks"] if include_tasks else [])
    app.conf.update(celery_config(settings))
    return app


celery_app = Celery("mcaas", include=["workers.tasks"])


@celery_app.on_configure.connect
def _configure(sender: Celery, **_: Any) -> None:
    sender.conf.update(celery_config(get_settings().require("worker")))


class _PoolLimits:
    """What the main process decided for its pool processes; they inherit it at fork."""

    shape: PoolShape | None = None
    memory_cap: int | None = None
    threads: int | None = None


@worker_init.connect
def _check_and_warm(sender: Any = None, **_: Any) -> None:
    """Fail start-up with a message naming a missing setting; load the steps before forking.

    Celery logs and swallows an Exception from a signal handler (the app's on_configure
    handler included, which then leaves Celery's defaults: a RabbitMQ broker on localhost),
    so a bad setting ends the worker here with SystemExit, before it connects anywhere.
    """
    from modules.core.registry import load_builtin_steps
    from modules.pipeline.settings import SettingsError, create_dev_resources

    try:
        settings = get_settings().require("worker")
    except SettingsError as exc:
        raise SystemExit(f"mcaas worker: {exc}") from None
    if settings.dev_mode:
        create_dev_resources(worker_services())
    load_builtin_steps()
    if sender is not None:
        _plan_pool(sender, settings)


def _plan_pool(worker: Any, settings: Settings) -> None:
    """Export the pool shape, decide each pool process's memory cap, and have billiard
    replace a pool process whose resident memory stays above half of it after a task."""
    shape = pool_shape(worker.concurrency)
    _PoolLimits.threads = export_pool_shape(shape)
    cap = memory_cap_bytes(
        settings.worker_memory_limit_mb,
        concurrency=shape.concurrency,
        cgroup_bytes=cgroup_memory_bytes(),
    )
    _PoolLimits.shape, _PoolLimits.memory_cap = shape, cap
    if cap is not None and not worker.max_memory_per_child:
        worker.max_memory_per_child = cap // 2 // 1024  # billiard counts KiB


@worker_process_init.connect
def _fresh_clients(**_: Any) -> None:
    # boto3 clients and SQLite connections must not be shared across a fork; nor what one
    # pool process has cached.
    worker_services.cache_clear()
    worker_step_cache.cache_clear()
    if _PoolLimits.memory_cap is not None:
        apply_memory_cap(_PoolLimits.memory_cap)
    if _PoolLimits.threads is not None:
        set_timing_threads(_PoolLimits.threads)
