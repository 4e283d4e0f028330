"""Benchmark: the full demo pipeline (`mcaas demo`'s jobs), step by step, with its verdicts.

Runs every job of `modules.cli.DEMO_JOBS` in-process through the runner (so through
run_step, exactly like `mcaas demo`) in a fresh workspace and writes
benchmarks/results/pipeline.md: per job, the per-step table (size, accuracy, batch-1
latency median with its 95% CI, the profile's estimated latency and energy, verdict,
step wall time), every gate verdict with its reason, the parity numbers and the hardware
simulation's fit and auto-batch.

Run: .venv/bin/python benchmarks/pipeline_demo.py [--profile edge-8mb] [--seed 0] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from modules.cli import DEMO_JOBS
from modules.core.jobspec import DEFAULT_PROFILE, parse_job_spec
from modules.core.records import StepRecord
from modules.core.versions import library_versions
from modules.evaluation.summary import summary_row
from modules.pipeline.local import LocalWorkspace

ROOT = Path(__file__).resolve().parents[1]


def _size(n: Any) -> str:
    if not isinstance(n, int | float):
        return "-"
    return f"{n / 1e6:.3f} MB" if n >= 1e5 else f"{n / 1e3:.1f} KB"


def _ms(value: Any, ci: Any = None) -> str:
    if not isinstance(value, int | float):
        return "-"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{value:.3f}"


def _num(value: Any, fmt: str = ".4g") -> str:
    return "-" if not isinstance(value, int | float) else format(value, fmt)


def step_table(records: list[dict[str, Any]]) -> list[str]:
    """The per-step markdown table of one job."""
    lines = [
        "| # | step | framework | size | accuracy | b1 ms median [95% CI] | "
        "est. b1 ms (estimate) | energy mJ/inference (estimate) | verdict | step s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for record in records:
        row = summary_row(record)
        acc = row["accuracy"]
        lines.append(
            f"| {row['index']} | {row['step']} | {row['framework'] or '-'} | "
            f"{_size(row['size_bytes'])} | {'-' if acc is None else f'{acc * 100:.2f}%'} | "
            f"{_ms(row['latency_b1_ms'], row['latency_b1_ci95'])} | "
            f"{_ms(row['estimated_latency_b1_ms'])} | {_num(row['energy_mj_estimate'])} | "
            f"{row['verdict'] or '-'} | {row['duration_s']:.2f} |"
        )
    return lines


def details(records: list[dict[str, Any]]) -> list[str]:
    """Verdicts with reasons, parity numbers and the hardware simulation's findings."""
    lines = ["", "Verdicts:", ""]
    for record in records:
        verdict = record.get("verdict")
        if verdict:
            state = "REJECTED" if StepRecord.of(record).rejected else "pass"
            lines.append(
                f"- step {record['index']} {record['step']}: **{state}**: {verdict['reason']}"
            )
    for record in records:
        m = record.get("metrics") or {}
        if record["step"] == "onnx_parity":
            native, ort = m["latency_ms"]["native"], m["latency_ms"]["onnxruntime"]
            lines += [
                "",
                f"Parity: label agreement {m['agreement']:.4f} on {m['n_samples']} test samples, "
                f"max |prob diff| {m['max_abs_prob_diff']:.3g}; batch-1 median native "
                f"{_ms(native['b1']['median'])} ms vs ONNX Runtime {_ms(ort['b1']['median'])} ms "
                f"(threads: {native['b1'].get('threads', 'default')}); "
                f"opsets {m['opset']}.",
            ]
        if record["step"] == "hardware_sim":
            lines += [
                "",
                f"Hardware simulation ({m['profile']}: {m['memory_budget_mb']:g} MB, compute "
                f"scale {m['compute_scale']:g}, {m['power_w']:g} W): {m['verdict']}; "
                f"auto-batch {m['auto_batch']}; " + "; ".join(m["fit_reasons"]) + ".",
            ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default=DEFAULT_PROFILE, help="Hardware profile.")
    parser.add_argument("--seed", type=int, default=0, help="Seed.")
    parser.add_argument("--out", type=Path, default=None, help="Workspace (default: a temp dir).")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch and scikit-learn threads for the whole run (0: library defaults).",
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=ROOT / "benchmarks" / "results" / "pipeline.md",
        help="Where the markdown table goes.",
    )
    args = parser.parse_args(argv)

    if args.threads:
        # On a shared 2-core machine a 2-thread torch/OpenMP op stalls for a scheduler slice
        # whenever another process holds a core; one thread is stable, and is what an edge
        # core has. ONNX Runtime sessions keep their own default pool.
        import torch
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)
    load_start = os.getloadavg()
    started = time.perf_counter()
    sections: list[str] = []
    with tempfile.TemporaryDirectory(prefix="mcaas-bench-") as tmp:
        ws = LocalWorkspace(args.out or Path(tmp))
        for job in DEMO_JOBS:
            spec = parse_job_spec(
                {
                    **job,
                    "job_id": f"{job['job_id']}-{int(time.time())}",
                    "profile": args.profile,
                    "seed": args.seed,
                    "dataset": "digits",
                }
            )
            t0 = time.perf_counter()
            result = ws.run(spec)
            wall = time.perf_counter() - t0
            print(f"{job['job_id']}: {result.status.value} in {wall:.1f} s", flush=True)
            sections += [
                "",
                f"## {job['job_id']}: {result.status.value} ({wall:.1f} s)",
                "",
                "Steps: " + " -> ".join(s["name"] for s in job["steps"]),
                "",
                *step_table([r.model_dump() for r in result.records]),
                *details([r.model_dump() for r in result.records]),
            ]
            if result.reason:
                sections += ["", f"Reason: {result.reason}"]
    total = time.perf_counter() - started
    versions = library_versions()
    header = [
        "# Full demo pipeline (`mcaas demo`'s jobs) on digits",
        "",
        f"- Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        f"- Machine: {platform.processor() or platform.machine()}, "
        f"{len(os.sched_getaffinity(0))} usable cores, {platform.system()} {platform.release()}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"- Load average (1/5/15 min) at start: {', '.join(f'{x:.1f}' for x in load_start)}, "
        f"at end: {', '.join(f'{x:.1f}' for x in os.getloadavg())} (a shared machine: absolute "
        "latencies are noisy)",
        f"- Profile: {args.profile}; seed {args.seed}; wall time of both jobs: {total:.1f} s; "
        f"torch / scikit-learn threads: {args.threads or 'library defaults'} (ONNX Runtime: "
        "its default pool, except the parity gate's comparison, which runs both sides on 1)",
        "- Latency: warm-up runs, then timed runs; the median with its order-statistic 95% CI. "
        "Estimates for the profile (hardware_sim): latency = measured / compute scale; energy "
        "= power x estimated latency (W x ms = mJ): an estimate, not a measurement.",
        "- Size: bytes of the artifact as stored. Pass-through steps (measure, gates, "
        "hardware_sim, report) show the size of the model they looked at.",
        "",
        "Reproduce: `.venv/bin/python benchmarks/pipeline_demo.py`",
    ]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text("\n".join(header + sections) + "\n", encoding="utf-8")
    print(f"wrote {args.results} ({total:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
