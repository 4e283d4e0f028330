"""kill -9 on the whole Celery worker mid-step; a new worker finishes the job.

acks_late keeps the step's message unacknowledged in Redis while it runs; with the worker
gone, kombu's restore sweep puts it back once the visibility timeout has passed, and the
new worker runs the step again. run_step writes the same keys and one record, so the job
ends with one record per step and no orphan artifact. The test also measures the delay
from the kill to the second start, which the visibility timeout sets.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.devstack import DevStack
from tests.integration.faults.conftest import (
    MEASURE,
    TRAIN,
    orphan_keys,
    settings_of,
    submit_job,
    wait_until,
)
from workers.celery_app import restore_interval_s

# Outwaits a 60 s visibility timeout: over a minute, so not in the default run.
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_killed_worker_step_is_redelivered_once(fault_stack: DevStack) -> None:
    fault_stack.service_env()
    first = fault_stack.start_worker("worker-a")
    services, job_id = submit_job(fault_stack, [TRAIN, MEASURE])

    # Whichever step is running when the job shows INPROGRESS is the one killed: on an idle
    # machine that may be step 1; either way exactly one step is started twice.
    wait_until(
        lambda: services.jobs.get(job_id).status == "INPROGRESS",
        timeout_s=90,
        what="a step to start on worker-a",
    )
    first.stop(sig=signal.SIGKILL, timeout=5)  # the main process and its pool, no warm shutdown
    killed_at = time.monotonic()
    assert not first.alive()
    killed = services.jobs.get(job_id)
    assert killed.status == "INPROGRESS", "the job ended before the kill; too fast"
    attempts_at_kill = int(killed.attempts)

    fault_stack.start_worker("worker-b")
    wait_until(
        lambda: services.jobs.get(job_id).attempts > attempts_at_kill,
        timeout_s=180,
        every_s=0.2,
        what="the step to be delivered again",
    )
    redelivered_after = time.monotonic() - killed_at
    job = wait_until(
        lambda: (j := services.jobs.get(job_id)).status in {"COMPLETED", "FAILED"} and j,
        timeout_s=240,
        every_s=0.2,
        what="the job to end",
    )

    assert job.status == "COMPLETED", job.reason
    records = services.log.records(job_id)
    assert [(r.index, r.step) for r in records] == [(0, "train"), (1, "measure")]
    assert job.attempts == 3  # the killed step twice, the other once
    assert orphan_keys(fault_stack, services, job_id) == []

    settings = settings_of(fault_stack)
    # Redis gives the message back only after the visibility timeout (never before: that
    # would mean a live worker's step could be run twice), within a sweep or so after it.
    assert redelivered_after >= settings.visibility_timeout_s - 2
    out = os.environ.get("MCAAS_RELIABILITY_DIR")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "worker_kill.json").write_text(
            json.dumps(
                {
                    "visibility_timeout_s": settings.visibility_timeout_s,
                    "restore_interval_s": restore_interval_s(settings),
                    "task_time_limit_s": settings.task_time_limit_s,
                    "redelivered_after_s": round(redelivered_after, 1),
                    "killed_step": int(killed.step_index),
                    "records": len(records),
                    "attempts": job.attempts,
                    "orphans": 0,
                },
                indent=2,
            )
        )
