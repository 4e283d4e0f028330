"""A worker started with bad settings stops at once with the message, before any broker."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.devstack import ROOT, compose_command, local_argv

pytestmark = pytest.mark.integration


def test_a_worker_with_bad_settings_refuses_to_start(tmp_path: Path) -> None:
    argv = local_argv(compose_command("worker"), port=0)
    env = {
        "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin",
        "HOME": str(tmp_path),
        "PYTHONPATH": str(ROOT),
        "MCAAS_STORE_URL": str(tmp_path / "store"),
        "MCAAS_STEP_LOG": "csv",
        "MCAAS_CSV_LOG": str(tmp_path / "steps.csv"),
        "MCAAS_JOBS_DB": str(tmp_path / "jobs.sqlite"),
        "REDIS_URL": "redis://127.0.0.1:6379/15",
        "MCAAS_TASK_SOFT_TIME_LIMIT_S": "40",  # not below the hard limit
        "MCAAS_TASK_TIME_LIMIT_S": "40",
        "MCAAS_VISIBILITY_TIMEOUT_S": "60",
    }
    done = subprocess.run(
        argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-2000:]
    assert "worker cannot start; set MCAAS_TASK_SOFT_TIME_LIMIT_S below" in output
    # Celery swallows a signal handler's error: without the SystemExit the worker started
    # on Celery's defaults and connected to a RabbitMQ on localhost.
    assert "amqp://" not in output and " ready." not in output
