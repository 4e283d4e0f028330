"""Each pool process's memory cap and its share of the cores."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from workers.process_limits import (
    CONCURRENCY_ENV,
    CPUS_ENV,
    PoolShape,
    cgroup_memory_bytes,
    export_pool_shape,
    memory_cap_bytes,
    pool_shape,
)


def test_the_setting_wins_over_the_cgroup() -> None:
    assert memory_cap_bytes(1024, concurrency=4, cgroup_bytes=8 * 2**30) == 2**30


def test_the_cgroup_limit_is_shared_among_the_pool_processes() -> None:
    assert memory_cap_bytes(0, concurrency=2, cgroup_bytes=10 * 2**30) == 9 * 2**30 // 2
    assert memory_cap_bytes(0, concurrency=1, cgroup_bytes=None) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [("max\n", None), ("4294967296\n", 2**32), ("9223372036854771712\n", None), ("junk", None)],
)
def test_cgroup_memory_limits_are_read(tmp_path: Path, text: str, expected: int | None) -> None:
    path = tmp_path / "memory.max"
    path.write_text(text)
    assert cgroup_memory_bytes((path,)) == expected


def test_no_cgroup_file_means_no_limit(tmp_path: Path) -> None:
    assert cgroup_memory_bytes((tmp_path / "absent",)) is None


def test_pool_shape_and_threads_per_process() -> None:
    cpus = len(os.sched_getaffinity(0))
    assert pool_shape(1) == PoolShape(concurrency=1, cpus=cpus)
    assert pool_shape("auto").concurrency == cpus
    assert PoolShape(concurrency=4, cpus=2).threads_per_process == 1
    assert PoolShape(concurrency=2, cpus=8).threads_per_process == 4


def test_the_pool_shape_is_exported(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (CONCURRENCY_ENV, CPUS_ENV, "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    export_pool_shape(PoolShape(concurrency=2, cpus=8))
    assert (os.environ[CONCURRENCY_ENV], os.environ[CPUS_ENV]) == ("2", "8")
    assert os.environ["OMP_NUM_THREADS"] == "4"


def test_an_allocation_past_the_cap_is_a_memory_error() -> None:
    # In a child process: the cap cannot be raised again once set.
    code = (
        "import numpy as np, resource\n"
        "from workers.process_limits import apply_memory_cap\n"
        "apply_memory_cap(1024 * 2**20)\n"
        "print(resource.getrlimit(resource.RLIMIT_AS)[0])\n"
        "try:\n    np.ones(2 * 2**30, dtype=np.uint8)\n"
        "except MemoryError as exc:\n    print('MemoryError', type(exc).__name__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    ).stdout.split("\n")
    assert out[0] == str(1024 * 2**20)
    assert out[1].startswith("MemoryError")


def test_compose_and_the_ecs_worker_run_one_pool_process_under_a_memory_cap() -> None:
    import yaml
    from cfnlint.decode import cfn_yaml

    from modules.pipeline.settings import Settings

    root = Path(__file__).resolve().parents[3]
    worker = yaml.safe_load((root / "docker-compose.yml").read_text())["services"]["worker"]
    assert "--concurrency=1" in worker["command"]
    cap_mb = Settings(**worker["environment"]).worker_memory_limit_mb
    assert 0 < cap_mb < int(worker["mem_limit"].removesuffix("g")) * 1024

    template = cfn_yaml.load(str(root / "infra" / "mcaas.yaml"))
    (container,) = template["Resources"]["WorkerTaskDefinition"]["Properties"][
        "ContainerDefinitions"
    ]
    assert "--concurrency=1" in container["Command"]
    env = {item["Name"]: item["Value"] for item in container["Environment"]}
    assert env["MCAAS_WORKER_MEMORY_LIMIT_MB"] == {"Ref": "WorkerMemoryLimitMb"}
    parameters = template["Parameters"]
    default_cap = parameters["WorkerMemoryLimitMb"]["Default"]
    assert default_cap < parameters["StepRunnerMemory"]["Default"]


def test_an_operators_lower_thread_count_is_kept_never_raised(monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert export_pool_shape(PoolShape(concurrency=1, cpus=8)) == 1
    assert os.environ["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "16")
    assert export_pool_shape(PoolShape(concurrency=2, cpus=8)) == 4
    assert os.environ["MKL_NUM_THREADS"] == "4"
