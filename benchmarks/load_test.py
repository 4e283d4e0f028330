"""A bounded load test of the API on loopback; writes benchmarks/results/load.md.

`python -m benchmarks.load_test` starts the compose topology as processes (moto, Redis,
one worker, uvicorn; see tests/devstack.py), then:

1. `--uploads` (20) concurrent uploads of a ~5 MB torch checkpoint;
2. `--jobs` (20) jobs submitted at once (measure on a small model), run by the worker;
3. `--pollers` (200) concurrent clients each polling GET /v1/jobs/{id} `--polls` (10) times.

Every phase is bounded by a request count and the whole run by `--deadline-s`, so the
generator stops by itself. It then waits for every job to end and counts the lost ones
(not COMPLETED). Latencies are client-side wall times per request; an error is a
transport failure or any status other than the one the route promises.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "load.md"
ALICE = {"X-API-Key": "dev-key-alice-0001"}
TERMINAL = {"COMPLETED", "FAILED", "REJECTED", "STOPPED"}


@dataclass
class Phase:
    """Latencies and errors of one kind of request."""

    name: str
    concurrency: int
    latencies_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def requests(self) -> int:
        return len(self.latencies_ms) + len(self.errors)

    def pct(self, q: float) -> float:
        """The q-th percentile (nearest rank) of the successful requests' latency."""
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
        return ordered[rank - 1]


def model_bytes(hidden: list[int]) -> bytes:
    """A torch checkpoint of an untrained zoo MLP (size is what matters here)."""
    from modules.core.artifact import ModelArtifact
    from modules.storage.architectures import build_model
    from modules.storage.model_formats import save_model

    arch = {"name": "mlp", "in_features": 64, "hidden": hidden, "num_classes": 10}
    return save_model(ModelArtifact("torch", build_model(arch), {}))


async def timed(
    phase: Phase, expect: int, call: Any, *args: Any, **kwargs: Any
) -> httpx.Response | None:
    start = time.perf_counter()
    try:
        response: httpx.Response = await call(*args, **kwargs)
    except httpx.HTTPError as exc:
        phase.errors.append(f"{type(exc).__name__}: {exc}")
        return None
    elapsed = (time.perf_counter() - start) * 1000
    if response.status_code != expect:
        phase.errors.append(f"{response.status_code}: {response.text[:200]}")
        return response
    phase.latencies_ms.append(elapsed)
    return response


async def run_phase(phase: Phase, tasks: list[Any], deadline: float) -> None:
    start = time.perf_counter()
    remaining = max(1.0, deadline - time.monotonic())
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=remaining)
    except TimeoutError:
        phase.errors.append("deadline reached: phase cut short")
    phase.wall_s = time.perf_counter() - start


async def load(url: str, args: argparse.Namespace) -> dict[str, Any]:
    deadline = time.monotonic() + args.deadline_s
    big = model_bytes([1200, 1000])
    small = model_bytes([32])
    limits = httpx.Limits(max_connections=args.pollers + args.uploads + 10)
    timeout = httpx.Timeout(args.request_timeout_s)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        uploads = Phase("upload 5 MB model (POST /v1/models)", args.uploads)

        async def one_upload() -> None:
            files = {"file": ("big.pt", big)}
            await timed(uploads, 201, client.post, "/v1/models", headers=ALICE, files=files)

        await run_phase(uploads, [one_upload() for _ in range(args.uploads)], deadline)

        small_model = await client.post(
            "/v1/models", headers=ALICE, files={"file": ("small.pt", small)}
        )
        small_model.raise_for_status()
        model_id = small_model.json()["id"]
        submits = Phase("submit job (POST /v1/jobs)", args.jobs)
        body = {"model_id": model_id, "steps": [{"name": "measure", "params": {"runs": 3}}]}
        job_ids: list[str] = []

        async def one_submit() -> None:
            response = await timed(submits, 202, client.post, "/v1/jobs", headers=ALICE, json=body)
            if response is not None and response.status_code == 202:
                job_ids.append(response.json()["id"])

        await run_phase(submits, [one_submit() for _ in range(args.jobs)], deadline)

        polls = Phase("poll job status (GET /v1/jobs/{id})", args.pollers)

        async def poller(i: int) -> None:
            for n in range(args.polls):
                job_id = job_ids[(i + n) % len(job_ids)]
                await timed(polls, 200, client.get, f"/v1/jobs/{job_id}", headers=ALICE)

        await run_phase(polls, [poller(i) for i in range(args.pollers)], deadline)

        # Every job must end; wait (bounded) and count those that did not complete.
        finals: dict[str, str] = {}
        settle_deadline = time.monotonic() + args.settle_s
        while time.monotonic() < settle_deadline:
            for job_id in job_ids:
                if job_id not in finals:
                    job = (await client.get(f"/v1/jobs/{job_id}", headers=ALICE)).json()
                    if job["status"] in TERMINAL:
                        finals[job_id] = job["status"]
            if len(finals) == len(job_ids):
                break
            await asyncio.sleep(1.0)
    completed = sum(1 for s in finals.values() if s == "COMPLETED")
    return {
        "phases": [uploads, submits, polls],
        "jobs": len(job_ids),
        "completed": completed,
        "lost": len(job_ids) - completed,
        "statuses": finals,
        "upload_bytes": len(big),
    }


def render(result: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        "# API load test",
        "",
        "`python -m benchmarks.load_test` (moto + Redis + 1 Celery worker + uvicorn on loopback,",
        "started by tests/devstack.py from docker-compose.yml and .env.example). Client-side",
        f"latency per request; host: {platform.machine()}, {os.cpu_count()} CPUs, Python",
        f"{platform.python_version()}; client and server share the host. Upload size:",
        f"{result['upload_bytes'] / 1e6:.2f} MB. Run at "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "| requests | concurrency | n | errors | error rate | p50 ms | p95 ms | p99 ms | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for phase in result["phases"]:
        rate = len(phase.errors) / phase.requests if phase.requests else 0.0
        lines.append(
            f"| {phase.name} | {phase.concurrency} | {phase.requests} | {len(phase.errors)} | "
            f"{rate:.1%} | {phase.pct(50):.0f} | {phase.pct(95):.0f} | {phase.pct(99):.0f} | "
            f"{phase.wall_s:.1f} |"
        )
    lines += [
        "",
        f"Jobs submitted: {result['jobs']}; completed: {result['completed']}; "
        f"**lost: {result['lost']}** (target 0).",
        "",
        f"Server side (uvicorn access log): {result['server_requests']} requests, "
        f"{result['server_5xx']} answered 5xx.",
        "",
        f"Pollers: {args.pollers} x {args.polls} polls each, spread over the submitted jobs.",
        "Errors are transport failures or an unexpected status; the first few:",
        "",
    ]
    errors = [e for phase in result["phases"] for e in phase.errors][:5]
    lines += [f"- `{e[:160]}`" for e in errors] or ["- none"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Start the stack, run the bounded load, write the results table."""
    parser = argparse.ArgumentParser(description="Bounded API load test on loopback.")
    parser.add_argument("--uploads", type=int, default=20, help="Concurrent 5 MB uploads.")
    parser.add_argument("--jobs", type=int, default=20, help="Jobs submitted at once.")
    parser.add_argument("--pollers", type=int, default=200, help="Concurrent status pollers.")
    parser.add_argument("--polls", type=int, default=10, help="Polls per poller.")
    parser.add_argument("--deadline-s", type=float, default=300, help="Cap on the load phases.")
    parser.add_argument("--settle-s", type=float, default=300, help="Cap on waiting for jobs.")
    parser.add_argument("--request-timeout-s", type=float, default=60, help="Per request.")
    parser.add_argument("--out", type=Path, default=RESULTS, help="Where to write the table.")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from tests.devstack import DevStack

    with DevStack(Path(tempfile.mkdtemp(prefix="mcaas-load-"))) as stack:
        stack.start_moto()
        stack.ensure_redis()
        stack.overrides["MCAAS_MAX_UPLOAD_MB"] = "10"
        # The load comes from a few users: measure the service, not its per-user limits.
        stack.overrides.update(
            {
                "MCAAS_UPLOADS_PER_MINUTE": "100000",
                "MCAAS_MAX_QUEUED_JOBS": "100000",
                "MCAAS_MAX_CONCURRENT_JOBS": "10000",
            }
        )
        stack.service_env()
        stack.start_worker()
        url = stack.start_api()
        result = asyncio.run(load(url, args))
        api_log = next(p for p in stack.processes if p.name == "api").log_tail(50_000_000)
        access = [line for line in api_log.splitlines() if '" ' in line and "HTTP/1.1" in line]
        result["server_requests"] = len(access)
        result["server_5xx"] = sum(1 for line in access if re.search(r'" 5\d\d\b', line))
    text = render(result, args)
    args.out.write_text(text, encoding="utf-8")
    print(text)
    return 0 if result["lost"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
