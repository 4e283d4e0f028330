"""Steps that behave as an attacker's job would: allocate without bound, kill their own
process, hold the CPU without ever checking for a stop.

The fault tests register them in their own process only while a test runs (the unit
suite's per-step tests must never see them), and the worker gets them through
`celery worker -I tests.integration.faults.hostile_worker_steps`.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from modules.core.registry import register_step, unregister_step
from modules.core.step import StepOutput
from modules.errors import McaasError
from workers.process_limits import CONCURRENCY_ENV, CPUS_ENV

ALLOCATE, KILL_SELF, HOLD_CPU = "h_allocate", "h_kill_self", "h_hold_cpu"
NAMES = (ALLOCATE, KILL_SELF, HOLD_CPU)
# Every input kind but ONNX's: these steps never look at the model.
ANY_INPUT = {"none", "torch", "sklearn"}


class AllocateParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    megabytes: int = Field(
        default=1, ge=1, le=1_048_576, description="MiB to allocate and touch, in one array."
    )


class KillSelfParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    signal_number: int = Field(
        default=int(signal.SIGKILL), ge=1, le=64, description="Signal sent to its own process."
    )


class HoldCpuParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    seconds: float = Field(
        default=600.0, gt=0, le=3600, description="How long to spin without a stop check."
    )


def allocate(model: Any, data: Any, params: AllocateParams, ctx: Any) -> StepOutput:
    """Allocate and touch one array of `megabytes` MiB."""
    import torch

    block = np.ones(params.megabytes * 2**20, dtype=np.uint8)
    metrics = {
        "allocated_bytes": int(block.nbytes),
        "sum": int(block[::4096].sum()),
        # What the pool process was given (workers/process_limits.py).
        "worker_concurrency": os.environ.get(CONCURRENCY_ENV),
        "worker_cpus": os.environ.get(CPUS_ENV),
        "torch_threads": torch.get_num_threads(),
    }
    return StepOutput(metrics=metrics)


def kill_self(model: Any, data: Any, params: KillSelfParams, ctx: Any) -> StepOutput:
    """Send a signal to its own (worker pool) process."""
    if CONCURRENCY_ENV not in os.environ:  # never the test runner's own process
        raise McaasError("h_kill_self runs only inside a worker")
    os.kill(os.getpid(), params.signal_number)
    time.sleep(30)  # the signal ends the process first
    return StepOutput()


def hold_cpu(model: Any, data: Any, params: HoldCpuParams, ctx: Any) -> StepOutput:
    """Spin for `seconds` and never call check_cancelled (as an unbounded ONNX Loop would)."""
    end = time.monotonic() + params.seconds
    spins = 0
    while time.monotonic() < end:
        spins += 1
    return StepOutput(metrics={"spins": spins})


def register_hostile_steps() -> None:
    """Register the three steps (each once)."""
    from modules.core.registry import list_steps

    known = {step.name for step in list_steps()}
    for name, fn, params in (
        (ALLOCATE, allocate, AllocateParams),
        (KILL_SELF, kill_self, KillSelfParams),
        (HOLD_CPU, hold_cpu, HoldCpuParams),
    ):
        if name not in known:
            register_step(name, params=params, accepts=ANY_INPUT)(fn)


def unregister_hostile_steps() -> None:
    for name in NAMES:
        unregister_step(name)
