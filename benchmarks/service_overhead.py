"""Service overhead: the demo pipeline over HTTP + Celery + S3/DynamoDB vs in-process.

    .venv/bin/python -m benchmarks.service_overhead [--runs 3] [--batch 20]

(as a module, from the repository root, so `api`, `workers` and `modules` import.)

Starts the compose topology as processes (tests/devstack.py: moto server, Redis,
Celery workers, uvicorn), then:

1. Overhead: the pipeline submitted over HTTP and run by one Celery worker against S3 and
   DynamoDB on the moto server, timed from POST /v1/jobs to the first poll that sees
   COMPLETED (polled every 20 ms), divided by the same pipeline run in-process with
   run_pipeline on a local workspace (local files, CSV, SQLite). Runs alternate so drift
   hits both sides; one warm-up of each is not counted. Target: ratio <= 1.15.
2. Concurrency: `--batch` jobs submitted at once to two workers. Every job must complete
   with exactly one step record per step (none lost, none duplicated); the total time is
   set against the sum of single-job times.

Writes benchmarks/results/service.md. Numbers depend on the machine and its load; the
file records both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import boto3
import httpx

from modules.cli import DEMO_JOBS
from modules.core.jobspec import parse_job_spec
from modules.evaluation.stats import summarize
from modules.pipeline.local import LocalWorkspace
from tests.devstack import ROOT, DevStack, read_env_file

# The demo's main job, exactly as `mcaas demo` runs it.
PIPELINE: list[dict[str, Any]] = DEMO_JOBS[0]["steps"]
# The service time is read from the job record's completion time, so polling can be slow
# without blurring it, and should be: each poll costs the API and moto CPU that, on a
# 2-core machine, the worker's step bodies would otherwise have.
POLL_S = 1.0
TARGET_RATIO = 1.15
BODIES = "step bodies (sum)"


def in_process_run(workspace: LocalWorkspace, job_id: str) -> tuple[float, dict[str, float]]:
    """Wall time of validating the job spec and running it through run_pipeline locally,
    and its phases."""
    start, clock = time.perf_counter(), time.time()
    spec = parse_job_spec({"job_id": job_id, "user_id": "alice", "steps": PIPELINE})
    result = workspace.run(spec)
    elapsed = time.perf_counter() - start
    if result.status != "COMPLETED":
        raise RuntimeError(f"in-process run {job_id} ended {result.status}: {result.reason}")
    records = [r.model_dump() for r in workspace.log.records(job_id)]
    return elapsed, phases(records, start=clock, end=clock + elapsed)


def submit(http: httpx.Client, headers: dict[str, str]) -> str:
    response = http.post("/v1/jobs", headers=headers, json={"steps": PIPELINE})
    response.raise_for_status()
    return str(response.json()["id"])


def wait_all(
    http: httpx.Client, headers: dict[str, str], job_ids: list[str], *, timeout_s: float
) -> dict[str, tuple[str, float]]:
    """Poll until every job is terminal; job id -> (status, epoch seconds it finished).

    The finish time is the job record's updated_at: written by the worker when it set
    the final status, on this machine's clock.
    """
    done: dict[str, tuple[str, float]] = {}
    deadline = time.monotonic() + timeout_s
    while len(done) < len(job_ids):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(job_ids) - len(done)} jobs did not finish in {timeout_s} s")
        for job_id in job_ids:
            if job_id in done:
                continue
            job = http.get(f"/v1/jobs/{job_id}", headers=headers).json()
            if job["status"] in {"COMPLETED", "FAILED", "REJECTED", "STOPPED"}:
                finished = datetime.fromisoformat(job["updated_at"]).timestamp()
                done[job_id] = (job["status"], finished)
                if job["status"] != "COMPLETED":
                    raise RuntimeError(f"job {job_id} ended {job['status']}: {job['reason']}")
        time.sleep(POLL_S)
    return done


def service_run(http: httpx.Client, headers: dict[str, str]) -> tuple[float, dict[str, float]]:
    """Wall time from POST /v1/jobs to the worker recording COMPLETED, and its phases."""
    start = time.time()
    job_id = submit(http, headers)
    finished = wait_all(http, headers, [job_id], timeout_s=600)[job_id][1]
    records = http.get(f"/v1/jobs/{job_id}", headers=headers).json()["records"]
    return finished - start, phases(records, start=start, end=finished)


def _epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()


def phases(records: list[dict[str, Any]], *, start: float, end: float) -> dict[str, float]:
    """Where a run's time went, in ms, from its step records' own timestamps.

    * before the first step: from the start to step 0's body starting;
    * between steps (summed): from one step's outputs saved to the next step's body
      starting (record write, hand-off, job record, step-log read, input download);
    * saving outputs (summed): from a body's end to its outputs saved;
    * after the last step: from the last outputs saved to the job's end (report.json,
      status).
    The step bodies themselves are the rest.
    """
    records = sorted(records, key=lambda r: r["index"])
    started = [_epoch(r["started_at"]) for r in records]
    finished = [_epoch(r["finished_at"]) for r in records]
    bodies = [r["duration_s"] for r in records]
    gaps = [s - f for s, f in zip(started[1:], finished[:-1], strict=True)]
    saves = [f - s - b for s, f, b in zip(started, finished, bodies, strict=True)]
    return {
        "before the first step": 1000 * (started[0] - start),
        "between steps (sum)": 1000 * sum(gaps),
        "saving outputs (sum)": 1000 * sum(saves),
        "after the last step": 1000 * (end - finished[-1]),
        BODIES: 1000 * sum(bodies),
    }


def step_record_counts(stack: DevStack, job_ids: list[str]) -> dict[str, Counter[int]]:
    """(job -> Counter of step index) from the DynamoDB steps table."""
    dynamodb = boto3.client("dynamodb", endpoint_url=stack.moto_url, region_name="us-east-1")
    counts: dict[str, Counter[int]] = {}
    for job_id in job_ids:
        items = dynamodb.query(
            TableName=stack.env["MCAAS_STEPS_TABLE"],
            KeyConditionExpression="job_id = :j",
            ExpressionAttributeValues={":j": {"S": job_id}},
            ConsistentRead=True,
        )["Items"]
        counts[job_id] = Counter(int(item["index"]["N"]) for item in items)
    return counts


def csv_record_counts(stack: DevStack, job_ids: list[str]) -> dict[str, Counter[int]]:
    import csv

    wanted = set(job_ids)
    counts: dict[str, Counter[int]] = {job_id: Counter() for job_id in job_ids}
    with open(stack.env["MCAAS_CSV_LOG"], newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if row["job_id"] in wanted:
                counts[row["job_id"]][int(row["index"])] += 1
    return counts


def fmt_stat(stat: dict[str, Any]) -> str:
    lo, hi = stat["ci95"]
    ci = f"95% CI [{lo:.2f}, {hi:.2f}]"
    return f"{stat['median']:.2f} (mean {stat['mean']:.2f}, {ci}, n={stat['n']})"


def write_report(path: Path, results: dict[str, Any]) -> None:
    overhead, batch = results["overhead"], results["batch"]
    ratio = overhead["ratio_of_medians"]
    lines = [
        "# Service overhead",
        "",
        f"Generated by `benchmarks/service_overhead.py` on {results['date']}.",
        "",
        "## Setup",
        "",
        f"- Machine: {results['cpus']} CPUs, {results['platform']}; load average "
        f"{results['load_before']} before, {results['load_after']} after (the benchmark's own "
        "processes count in it; more means other work shared the cores); benchmark processes "
        "ran at "
        f"niceness {results['niceness']} with {results['threads']} torch/OpenMP thread(s) "
        "each, on both sides.",
        f"- Versions: {results['versions']}.",
        "- Service: the docker-compose topology as processes (tests/devstack.py): uvicorn "
        "(api), Celery prefork workers with concurrency 1 on Redis, S3 + DynamoDB on a moto "
        "server over HTTP, step records in DynamoDB and CSV, settings from .env.example.",
        "- In-process: `run_pipeline` on a `LocalWorkspace` (local files, CSV, SQLite).",
        "- Pipeline: the demo's main job (`mcaas demo`, modules/cli.py DEMO_JOBS[0]): "
        + " -> ".join(step["name"] for step in PIPELINE)
        + f"; train params {json.dumps(PIPELINE[0]['params'])}.",
        "- Service time: from sending POST /v1/jobs to the moment the worker recorded "
        "COMPLETED (the job record's updated_at, same machine clock). Runs alternate between "
        "the two sides; one warm-up each is not counted.",
        "",
        "## 1. Overhead of the service (one worker)",
        "",
        "| | wall time, s: median (mean, 95% CI, n) |",
        "|---|---|",
        f"| in-process | {fmt_stat(overhead['in_process'])} |",
        f"| HTTP + Celery + S3/DynamoDB (moto) | {fmt_stat(overhead['service'])} |",
        "",
        f"**Overhead ratio (median service / median in-process): {ratio:.3f}** "
        f"(target <= {TARGET_RATIO}: {'met' if ratio <= TARGET_RATIO else 'NOT met'}).",
        "",
        "| run | in-process, s | service, s | ratio |",
        "|---|---|---|---|",
        *(
            f"| {i} | {p:.2f} | {q:.2f} | {q / p:.3f} |"
            for i, (p, q) in enumerate(
                zip(overhead["in_process_runs"], overhead["service_runs"], strict=True)
            )
        ),
        "",
        (
            f"The service adds a roughly fixed cost per step: {overhead['per_step_ms']:.0f} ms "
            f"(median difference / {len(PIPELINE)} steps): the job and step records in "
            "DynamoDB, the artifacts in S3 (moto round trips), and once per job the HTTP "
            "submission and the Celery pick-up. The ratio therefore depends on how long the "
            f"steps run: it reaches {TARGET_RATIO} once the in-process pipeline takes about "
            f"{overhead['break_even_s']:.1f} s."
            if overhead["per_step_ms"] > 0
            else "The medians' difference is negative: the in-process runs met more "
            "contention on the shared cores than the service runs, and the difference is "
            "noise. The phases below, outside the step bodies, show what the service adds."
        ),
        "",
        "Where the time goes, from the step records' own timestamps (median over the timed "
        "runs, ms; sums over the steps):",
        "",
        "| phase | in-process | service | service - in-process |",
        "|---|---|---|---|",
        *(
            f"| {name} | {a:.0f} | {b:.0f} | {b - a:+.0f} |"
            for name, (a, b) in overhead["phases"].items()
        ),
        "",
        "The step bodies are the same code on both sides; their difference is noise and "
        "contention on the shared cores. Counting only the phases around them (the service's "
        "median extra time outside the step bodies, added to the in-process median), the "
        f"ratio is {overhead['non_body_ratio']:.3f}.",
        "",
        "Per step the service makes three S3/DynamoDB round trips to the moto server where "
        "the in-process run touches local files and SQLite: one guarded UpdateItem that reads "
        "the job, marks the step running and counts the attempt (for a step run in a row, "
        "sent from a second thread while the step's body runs); the output upload (plus one "
        "per extra file); and the conditional put of the step record. A task runs the job's "
        "next steps itself for up to MCAAS_CONTINUE_INLINE_S "
        f"({float(read_env_file()['MCAAS_CONTINUE_INLINE_S']):g} s here), so "
        "this short pipeline is one Celery task: no broker hand-off or hand-off note between "
        "its steps. The next step of a job takes the earlier records and the input model "
        "from the worker process's cache (modules/pipeline/step_cache.py). Each round trip "
        "costs a few milliseconds against moto, most of it moto's own processing.",
        "",
        "## 2. Concurrency: jobs submitted at once to two workers",
        "",
        f"- Jobs submitted: {batch['jobs']}; completed: {batch['completed']}; "
        f"lost: {batch['lost']}; duplicated step records: {batch['duplicated_records']} "
        f"(DynamoDB), {batch['duplicated_csv_rows']} (CSV); every job has exactly "
        f"{len(PIPELINE)} records: {'yes' if batch['exact_records'] else 'NO'}; "
        f"redelivered steps (attempts beyond one per step): {batch['extra_attempts']}.",
        f"- Total wall time, first POST to last COMPLETED: {batch['total_s']:.1f} s.",
        f"- Sum of single-job times ({batch['jobs']} x the median single-job service time "
        f"above): {batch['sum_single_s']:.1f} s; ratio total / sum = "
        f"{batch['total_s'] / batch['sum_single_s']:.2f} (two workers: 0.5 would be a "
        "perfect split; both share this machine's cores).",
        f"- Per-job time from the batch's start to its completion: {fmt_stat(batch['latency'])}"
        f"; first job done after {batch['first_s']:.1f} s. A started job's next step is "
        "queued ahead of jobs not yet started (Redis priority), so jobs finish one after "
        "another rather than all at the end.",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="Timed runs per side.")
    parser.add_argument("--batch", type=int, default=20, help="Jobs submitted at once.")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="Torch/OpenMP threads per process, both sides (the workers inherit it).",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "service.md")
    args = parser.parse_args(argv)
    # Make `kill` run the stack's clean-up (the `with DevStack` exit) like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # Same thread count on both sides; on a small shared machine, spinning OpenMP threads of
    # several processes slow each other down far more than the service does.
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    keys = dict(pair.split(":") for pair in read_env_file()["MCAAS_API_KEYS"].split(","))
    headers = {"X-API-Key": next(key for key, user in keys.items() if user == "alice")}
    load_before = ", ".join(f"{x:.2f}" for x in os.getloadavg())

    with (
        tempfile.TemporaryDirectory(prefix="mcaas-bench-") as tmp,
        DevStack(Path(tmp) / "stack") as stack,
    ):
        stack.start_moto()
        stack.ensure_redis()
        # A batch of one user's jobs at once: measure the service, not its per-user limits.
        stack.overrides.update({"MCAAS_MAX_QUEUED_JOBS": "10000"})
        stack.service_env()
        os.environ.update(
            {
                "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1",
            }
        )
        stack.start_worker("worker-1")
        url = stack.start_api()
        workspace = LocalWorkspace(Path(tmp) / "local")
        with httpx.Client(base_url=url, timeout=60) as http:
            print("warm-up", flush=True)
            in_process_run(workspace, "warmup")
            service_run(http, headers)
            local_times, service_times = [], []
            local_phases: list[dict[str, float]] = []
            service_phases: list[dict[str, float]] = []
            for i in range(args.runs):
                elapsed, parts = in_process_run(workspace, f"run-{i}")
                local_times.append(elapsed)
                local_phases.append(parts)
                elapsed, parts = service_run(http, headers)
                service_times.append(elapsed)
                service_phases.append(parts)
                print(
                    f"run {i}: in-process {local_times[-1]:.2f} s, "
                    f"service {service_times[-1]:.2f} s",
                    flush=True,
                )

            stack.start_worker("worker-2")
            print(f"batch of {args.batch}", flush=True)
            start = time.time()
            with ThreadPoolExecutor(max_workers=args.batch) as pool:
                job_ids = list(pool.map(lambda _: submit(http, headers), range(args.batch)))
            finished = wait_all(http, headers, job_ids, timeout_s=3600)
            total = max(t for _, t in finished.values()) - start
            jobs = {j: http.get(f"/v1/jobs/{j}", headers=headers).json() for j in job_ids}

        dynamo_counts = step_record_counts(stack, job_ids)
        csv_counts = csv_record_counts(stack, job_ids)
    expected = Counter(range(len(PIPELINE)))
    median_service = statistics.median(service_times)
    phases_table = {
        name: (
            statistics.median(p[name] for p in local_phases),
            statistics.median(p[name] for p in service_phases),
        )
        for name in local_phases[0]
    }
    results = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "platform": f"{platform.system()} {platform.machine()}, Python {platform.python_version()}",
        "versions": ", ".join(
            f"{name} {metadata.version(name)}"
            for name in ("torch", "celery", "kombu", "fastapi", "uvicorn", "moto", "boto3")
        ),
        "load_before": load_before,
        "niceness": os.nice(0),
        "threads": args.threads,
        "load_after": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
        "overhead": {
            "in_process": summarize(local_times, unit="s"),
            "service": summarize(service_times, unit="s"),
            "ratio_of_medians": median_service / statistics.median(local_times),
            "in_process_runs": local_times,
            "service_runs": service_times,
            "per_step_ms": 1000 * (median_service - statistics.median(local_times)) / len(PIPELINE),
            "break_even_s": (median_service - statistics.median(local_times)) / (TARGET_RATIO - 1),
            "phases": phases_table,
            "non_body_ratio": (
                statistics.median(local_times)
                + sum(b - a for name, (a, b) in phases_table.items() if name != BODIES) / 1000
            )
            / statistics.median(local_times),
        },
        "batch": {
            "jobs": len(job_ids),
            "completed": sum(1 for s, _ in finished.values() if s == "COMPLETED"),
            "lost": len(job_ids) - len(finished),
            "duplicated_records": sum(
                n - 1 for c in dynamo_counts.values() for n in c.values() if n > 1
            ),
            "duplicated_csv_rows": sum(
                n - 1 for c in csv_counts.values() for n in c.values() if n > 1
            ),
            "exact_records": all(c == expected for c in dynamo_counts.values())
            and all(c == expected for c in csv_counts.values()),
            "extra_attempts": sum(job["attempts"] - len(PIPELINE) for job in jobs.values()),
            "total_s": total,
            "sum_single_s": median_service * len(job_ids),
            "latency": summarize([t - start for _, t in finished.values()], unit="s"),
            "first_s": min(t for _, t in finished.values()) - start,
        },
    }
    write_report(args.out, results)
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
