"""Shared real processes for integration tests: one moto server serving every AWS API."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

MOTO_START_TIMEOUT_S = 30.0

# Fake credentials and a pinned region so boto3 never reaches real AWS or a developer's profile.
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}
CLEARED_AWS_ENV = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE")


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _moto_server_command(port: int) -> list[str]:
    script = Path(sys.executable).parent / "moto_server"
    if not script.exists():
        found = shutil.which("moto_server")
        if found is None:
            raise RuntimeError("moto_server not found; install the dev extra (moto[server])")
        script = Path(found)
    return [str(script), "-H", "127.0.0.1", "-p", str(port)]


def _wait_for_http(url: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + MOTO_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log = log_path.read_text(errors="replace")
            raise RuntimeError(f"moto_server exited with {proc.returncode}:\n{log}")
        try:
            with urllib.request.urlopen(url + "/moto-api/", timeout=1):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.1)
    raise RuntimeError(f"moto_server did not answer on {url} within {MOTO_START_TIMEOUT_S} s")


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """Start `moto_server` on a free port; yield its URL with fake creds and AWS_ENDPOINT_URL set.

    S3, DynamoDB, ECS and CloudFormation are all served by this one process. Tests share it,
    so each should use its own bucket and table names.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    saved = {name: os.environ.get(name) for name in [*FAKE_AWS_ENV, *CLEARED_AWS_ENV]}
    saved["AWS_ENDPOINT_URL"] = os.environ.get("AWS_ENDPOINT_URL")
    log_fd, log_name = tempfile.mkstemp(prefix="moto-", suffix=".log")
    log_path = Path(log_name)
    with os.fdopen(log_fd, "wb") as log_file:
        # The child keeps its own copy of the descriptor; a file, not a pipe, so it never blocks.
        proc = subprocess.Popen(
            _moto_server_command(port),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        _wait_for_http(url, proc, log_path)
        os.environ.update(FAKE_AWS_ENV)
        os.environ["AWS_ENDPOINT_URL"] = url
        for name in CLEARED_AWS_ENV:
            os.environ.pop(name, None)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log_path.unlink(missing_ok=True)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
