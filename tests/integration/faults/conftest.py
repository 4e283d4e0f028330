"""Faults injected into real processes: each test gets its own stack so a kill harms no other test.

Each stack runs against the shared moto server (own bucket and tables) and a Redis
database of its own; the limits are short so a lost step shows within a test's time.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import boto3
import pytest

from modules.core.jobspec import parse_job_spec
from modules.core.records import JobRecord
from modules.pipeline.settings import Services, Settings, build_services, create_dev_resources
from tests.devstack import DevStack, free_port
from tests.integration.service.conftest import redis_url  # noqa: F401  (a fixture, by name)
from workers.dispatch import make_dispatcher

TERMINAL = {"COMPLETED", "FAILED", "REJECTED", "STOPPED"}
# Far above a small step's few seconds even on a loaded two-core machine, short enough for
# a test to outwait them.
SHORT_LIMITS = {
    "MCAAS_TASK_SOFT_TIME_LIMIT_S": "45",
    "MCAAS_CONTINUE_INLINE_S": "20",
    "MCAAS_TASK_TIME_LIMIT_S": "50",
    "MCAAS_VISIBILITY_TIMEOUT_S": "60",
}
TRAIN = {
    "name": "train",
    "params": {"model": "mlp", "epochs": 10, "arch": {"name": "mlp", "hidden": [128, 128]}},
}
MEASURE = {"name": "measure", "params": {"runs": 3, "warmup": 1}}


def redis_db(url: str, db: int) -> str:
    """The same Redis server, another database (its own queues and unacked bookkeeping)."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{db}"))


def wait_until(check: Any, *, timeout_s: float, what: str, every_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def dump_result(name: str, data: Any) -> None:
    """Write a test's figures to $MCAAS_RELIABILITY_DIR (for benchmarks/results/reliability.md)."""
    out = os.environ.get("MCAAS_RELIABILITY_DIR")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"{name}.json").write_text(json.dumps(data, indent=2, default=str))


def settings_of(stack: DevStack) -> Settings:
    return Settings(**{k: v for k, v in stack.env.items() if k.isupper()})


def submit_job(
    stack: DevStack,
    steps: list[dict[str, Any]],
    *,
    create_resources: bool = True,
    user: str = "alice",
) -> tuple[Services, str]:
    """Store and queue a job the way the API does; return the stack's services and the id."""
    settings = settings_of(stack)
    services = build_services(settings)
    if create_resources:  # the API or worker may not have created the bucket and tables yet
        create_dev_resources(services)
    spec = parse_job_spec({"user_id": user, "steps": steps})
    services.jobs.create(JobRecord.new(spec))
    make_dispatcher(settings, services).submit(spec.job_id)
    return services, spec.job_id


def s3_keys(stack: DevStack, prefix: str = "") -> list[str]:
    s3 = boto3.client("s3", endpoint_url=stack.moto_url, region_name="us-east-1")
    pages = s3.get_paginator("list_objects_v2").paginate(
        Bucket=stack.env["MODEL_BUCKET"], Prefix=prefix
    )
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


def orphan_keys(stack: DevStack, services: Services, job_id: str) -> list[str]:
    """Keys under the job's folder that no step record (or the job report) points at."""
    records = services.log.records(job_id)
    referenced = {r.output_key for r in records if r.output_key}
    referenced |= {key for r in records for key in (r.files or {}).values()}
    keys = [k for k in s3_keys(stack, "users/alice/") if f"/{job_id}/" in k]
    return [k for k in keys if k not in referenced and not k.endswith(f"/{job_id}/report.json")]


@pytest.fixture
def fault_stack(
    moto_endpoint: str,
    redis_url: str,  # noqa: F811  (the imported fixture)
    tmp_path: Path,
) -> Iterator[DevStack]:
    """A stack of this test's own (not started: the test starts what it needs)."""
    stack = DevStack(tmp_path / "stack", moto_url=moto_endpoint, redis_url=redis_db(redis_url, 13))
    stack.overrides.update(SHORT_LIMITS)
    try:
        yield stack
    finally:
        stack.stop()


class RedisServer:
    """A redis-server of the test's own, which it may kill and start again on the same port."""

    def __init__(self, workdir: Path, *, persistent: bool) -> None:
        self.workdir, self.persistent = workdir, persistent
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        server = shutil.which("redis-server")
        if server is None:
            pytest.fail("redis-server is not installed; the Redis restart tests need it")
        # The compose file runs Redis with --appendonly yes; fsync always so a kill -9
        # loses nothing that was acknowledged.
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if self.persistent
            else ["--appendonly", "no"]
        )
        argv = [server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--dir", str(self.workdir), *persistence]
        with open(self.workdir / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        wait_until(self._answers, timeout_s=20, what="redis-server to answer")

    def _answers(self) -> bool:
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock,
        ):
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
        return False

    def kill(self) -> None:
        """kill -9: no shutdown save; only what the append-only file already holds survives."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


class TcpProxy:
    """A loopback TCP relay to `target_port` that can go away and come back on its port.

    Cutting it is what an S3/DynamoDB outage looks like to a client (connection refused,
    connections reset) while moto keeps its state, as the real services would.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        """Refuse new connections and reset every open one."""
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._open.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._open |= {client, upstream}
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
