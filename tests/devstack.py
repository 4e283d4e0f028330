"""A test and benchmark harness: the docker-compose topology as local processes (no Docker).

Reads docker-compose.yml and .env.example, and starts moto, the Celery worker(s) and the
API with the commands compose would run, with the env file's settings. Only host names,
ports and the bucket/table/queue names change (so runs do not share state). The
integration tests and benchmarks/service_overhead.py use it; `python -m tests.devstack`
runs the stack until Ctrl-C.

Every process is started in its own session and stopped by its process-group id.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_FILE = ROOT / ".env.example"
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 15.0

# Fake credentials so boto3 never reaches real AWS or a developer's profile.
FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class StackError(RuntimeError):
    """A service did not start; the message carries the tail of its log."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def read_env_file(path: Path = ENV_FILE) -> dict[str, str]:
    """KEY=VALUE lines of a compose env file (no quotes or interpolation, like compose's)."""
    env: dict[str, str] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"{path}: line {raw!r} is not KEY=VALUE")
        env[key.strip()] = value.strip()
    return env


def compose_services(path: Path = COMPOSE_FILE) -> dict[str, Any]:
    """The `services` mapping of docker-compose.yml."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    services: dict[str, Any] = data["services"]
    return services


def compose_command(service: str, *, path: Path = COMPOSE_FILE) -> list[str]:
    """The service's entrypoint + command as one argv list."""
    spec = compose_services(path)[service]
    entrypoint = spec.get("entrypoint") or []
    command = spec.get("command") or []
    if isinstance(entrypoint, str) or isinstance(command, str):
        raise ValueError(f"compose service {service!r}: use list-form entrypoint/command")
    return [str(part) for part in [*entrypoint, *command]]


def local_argv(argv: list[str], *, port: int) -> list[str]:
    """Run a compose command here: venv executables, 127.0.0.1, and our port."""
    bin_dir = Path(sys.executable).parent
    program = bin_dir / argv[0]
    if not program.exists():
        found = shutil.which(argv[0])
        if found is None:
            raise StackError(f"{argv[0]} not found in {bin_dir} or on PATH")
        program = Path(found)
    out = [str(program)]
    for arg in argv[1:]:
        if arg == "0.0.0.0":
            arg = "127.0.0.1"
        elif arg in {"5000", "8000", "5555"}:
            arg = str(port)
        elif arg.startswith("--port="):
            arg = f"--port={port}"
        out.append(arg)
    return out


@dataclass
class Process:
    """One started service."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, *, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> None:
        """Signal the process group we started; SIGKILL it if it outlives `timeout`."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=timeout)
        # Children (prefork pool) share the group; make sure none outlives the parent.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=timeout)


def _ping_redis(url: str) -> bool:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
    try:
        return bool(client.ping())
    except Exception:
        return False
    finally:
        client.close()


@dataclass
class DevStack:
    """moto + Redis + worker(s) + API as processes, configured from .env.example."""

    workdir: Path
    redis_url: str | None = None
    moto_url: str | None = None
    overrides: dict[str, str] = field(default_factory=dict)
    processes: list[Process] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    api_url: str | None = None

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.run_id = uuid.uuid4().hex[:10]

    # --- processes -------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> Process:
        log_path = self.workdir / f"{name}.log"
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        process = Process(name, popen, log_path)
        self.processes.append(process)
        return process

    def _wait(self, process: Process, ready: Any, what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if not process.alive():
                raise StackError(
                    f"{process.name} exited with {process.popen.returncode}:\n{process.log_tail()}"
                )
            if ready():
                return
            time.sleep(0.1)
        raise StackError(
            f"{process.name}: no {what} within {START_TIMEOUT_S} s:\n{process.log_tail()}"
        )

    def start_moto(self) -> str:
        """moto_server on a free port, with compose's moto command."""
        port = free_port()
        argv = local_argv(compose_command("moto"), port=port)
        process = self._spawn("moto", argv, {**os.environ})
        url = f"http://127.0.0.1:{port}"

        def answers() -> bool:
            try:
                with urllib.request.urlopen(url + "/moto-api/", timeout=1):
                    return True
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                return False

        self._wait(process, answers, "answer on /moto-api/")
        self.moto_url = url
        return url

    def ensure_redis(self, url: str | None = None) -> str:
        """Use the Redis at `url` (or REDIS_URL) if it answers, else start redis-server."""
        candidate = url or os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/11"
        if _ping_redis(candidate):
            self.redis_url = candidate
            return candidate
        server = shutil.which("redis-server")
        if server is None:
            raise StackError(f"no Redis answers at {candidate} and redis-server is not installed")
        port = free_port()
        argv = [
            server,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        process = self._spawn("redis", argv, {**os.environ})
        started = f"redis://127.0.0.1:{port}/0"
        self._wait(process, lambda: _ping_redis(started), "PONG")
        self.redis_url = started
        return started

    def service_env(self) -> dict[str, str]:
        """The env of api/worker: .env.example with hosts, files and names made local."""
        if self.moto_url is None or self.redis_url is None:
            raise StackError("start moto and Redis before the api and workers")
        env = {**os.environ, **read_env_file(), **FAKE_AWS}
        env.update(
            {
                "AWS_ENDPOINT_URL": self.moto_url,
                "REDIS_URL": self.redis_url,
                "MCAAS_CSV_LOG": str(self.workdir / "steps.csv"),
                "MCAAS_STORE_URL": f"s3://mcaas-{self.run_id}",
                "MODEL_BUCKET": f"mcaas-{self.run_id}",
                "MCAAS_JOBS_TABLE": f"mcaas-jobs-{self.run_id}",
                "MCAAS_STEPS_TABLE": f"mcaas-steps-{self.run_id}",
                "MCAAS_QUEUE": f"mcaas.steps.{self.run_id}",
                "PYTHONPATH": str(ROOT),
            }
        )
        for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN"):
            env.pop(name, None)
        env.update(self.overrides)
        self.env = env
        return env

    def start_worker(self, name: str = "worker", *, extra_args: tuple[str, ...] = ()) -> Process:
        """A Celery worker with compose's worker command (plus `extra_args`, e.g. `-I` a
        module of test steps); waits for 'ready'."""
        env = self.env or self.service_env()
        argv = local_argv(compose_command("worker"), port=0)
        argv += ["-n", f"{name}-{self.run_id}@%h", *extra_args]
        process = self._spawn(name, argv, env)
        self._wait(process, lambda: " ready." in process.log_tail(100_000), "'ready.' in its log")
        return process

    def start_api(self) -> str:
        """uvicorn with compose's api command on a free port; waits for /readyz."""
        env = self.env or self.service_env()
        port = free_port()
        argv = local_argv(compose_command("api"), port=port)
        process = self._spawn("api", argv, env)
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=2) as response:
                    return bool(response.status == 200)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                return False

        self._wait(process, ready, "200 from /readyz")
        self.api_url = url
        return url

    def stop(self) -> None:
        """Stop every process this stack started, newest first."""
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()

    def __enter__(self) -> DevStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> int:
    """Run moto, Redis (if none answers), one worker and the API until Ctrl-C."""
    import tempfile

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with DevStack(Path(tempfile.mkdtemp(prefix="mcaas-devstack-"))) as stack:
        stack.start_moto()
        stack.ensure_redis()
        stack.service_env()
        stack.start_worker()
        url = stack.start_api()
        keys = stack.env["MCAAS_API_KEYS"]
        print(f"api: {url}  (keys: {keys})\nmoto: {stack.moto_url}\nlogs: {stack.workdir}")
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
