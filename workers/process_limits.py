"""What each worker pool process may use: an address-space cap, and the cores timing gets.

A step that allocates past the cap (MCAAS_WORKER_MEMORY_LIMIT_MB, or the container's cgroup
memory limit shared among the pool processes) gets a MemoryError in its own process, which
the task turns into a FAILED job; without the cap the kernel's OOM killer would end the
pool process (or the whole container) instead.

Honest timing: a worker that runs several pool processes on few cores times each job's
model against the others' work. The worker exports its pool size and the cores it has as
MCAAS_WORKER_CONCURRENCY and MCAAS_WORKER_CPUS (steps that time read them), and gives each
pool process an equal share of the cores for torch and ONNX Runtime threads.
"""

from __future__ import annotations

import logging
import math
import os
import resource
from pathlib import Path
from typing import NamedTuple

from celery.utils.sysinfo import cpu_budget

logger = logging.getLogger(__name__)

CONCURRENCY_ENV = "MCAAS_WORKER_CONCURRENCY"
CPUS_ENV = "MCAAS_WORKER_CPUS"
# The thread-count variables torch (OpenMP, MKL) and NumPy's BLAS read at start-up.
THREAD_ENVS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
CGROUP_MEMORY_MAX = Path("/sys/fs/cgroup/memory.max")
CGROUP_V1_MEMORY_LIMIT = Path("/sys/fs/cgroup/memory/memory.limit_in_bytes")
# A cgroup v1 "no limit" is a huge page-aligned number; anything above this is no limit.
_UNLIMITED_BYTES = 2**60


class PoolShape(NamedTuple):
    """How many pool processes a worker runs and the cores it has for them."""

    concurrency: int
    cpus: int

    @property
    def threads_per_process(self) -> int:
        """Cores each pool process may use for intra-op threads (at least one)."""
        return max(1, self.cpus // self.concurrency)


def pool_shape(concurrency: object) -> PoolShape:
    """The worker's pool size (Celery's `concurrency`, possibly "auto" or unset) and the
    cores available to it (CPU affinity capped by a cgroup CPU quota)."""
    cpus = cpu_budget(use_cgroup_quota=True).count
    size = concurrency if isinstance(concurrency, int) and concurrency > 0 else cpus
    return PoolShape(concurrency=size, cpus=cpus)


def export_pool_shape(shape: PoolShape) -> int:
    """Put the pool shape and the per-process thread count in the environment, before the
    pool forks, so every pool process (and what it starts) sees them; returns that count.

    An OMP_NUM_THREADS the operator set is kept when it is below the process's share of
    the cores (a benchmark pinning both sides to one thread), never raised above it.
    """
    threads = shape.threads_per_process
    given = os.environ.get("OMP_NUM_THREADS", "").strip()
    if given.isdigit() and int(given) > 0:
        threads = min(threads, int(given))
    os.environ[CONCURRENCY_ENV] = str(shape.concurrency)
    os.environ[CPUS_ENV] = str(shape.cpus)
    for name in THREAD_ENVS:
        os.environ[name] = str(threads)
    return threads


def set_timing_threads(threads: int) -> None:
    """Set torch's intra-op threads in this (already started) process."""
    import torch

    torch.set_num_threads(threads)


def cgroup_memory_bytes(
    paths: tuple[Path, ...] = (CGROUP_MEMORY_MAX, CGROUP_V1_MEMORY_LIMIT),
) -> int | None:
    """The memory limit of this process's cgroup (v2 or v1), or None when there is none."""
    for path in paths:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text == "max":
            return None
        try:
            value = int(text)
        except ValueError:
            continue
        return value if 0 < value < _UNLIMITED_BYTES else None
    return None


def memory_cap_bytes(limit_mb: int, *, concurrency: int, cgroup_bytes: int | None) -> int | None:
    """The address-space cap of one pool process: the setting when given, else 90% of the
    cgroup limit shared among the pool processes (room for the main process), else None."""
    if limit_mb > 0:
        return limit_mb * 2**20
    if cgroup_bytes is None:
        return None
    return math.floor(cgroup_bytes * 0.9 / max(1, concurrency))


def apply_memory_cap(cap_bytes: int) -> None:
    """Cap this process's address space (RLIMIT_AS); an allocation past it raises
    MemoryError (NumPy, Python) or a RuntimeError naming the allocator (torch)."""
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        cap_bytes = min(cap_bytes, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap_bytes, hard))
    logger.info("pool process %d: address space capped at %d MiB", os.getpid(), cap_bytes >> 20)
