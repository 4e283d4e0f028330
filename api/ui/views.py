"""What the dashboard shows, computed from job and step records (plain data, no HTML)."""

from __future__ import annotations

from typing import Any

from modules.core.records import JobRecord, StepRecord
from modules.evaluation.summary import (
    batch_column_title,
    fmt_batch_latency,
    fmt_latency,
    summary_row,
)


def fmt_size(n: Any) -> str:
    """Bytes as KB or MB."""
    if isinstance(n, bool) or not isinstance(n, int | float):
        return "-"
    return f"{n / 1e6:.3f} MB" if n >= 1e5 else f"{n / 1e3:.1f} KB"


def fmt_pct(value: Any) -> str:
    """A 0..1 share as a percentage."""
    return "-" if not isinstance(value, int | float) else f"{value * 100:.2f}%"


def step_rows(records: list[StepRecord]) -> list[dict[str, Any]]:
    """One table row per step record: size, latency with CI, accuracy, verdict."""
    rows = []
    ordered = sorted(records, key=lambda r: r.index)
    summary = [summary_row(r) for r in ordered]
    title = batch_column_title(summary)
    for record, row in zip(ordered, summary, strict=True):
        verdict = record.verdict
        rows.append(
            {
                "index": row["index"],
                "step": row["step"],
                "framework": row["framework"] or "-",
                "size": fmt_size(row["size_bytes"]),
                "latency_b1": fmt_latency(
                    row["latency_b1_ms"], row["latency_b1_ci95"], row["latency_b1_noisy"]
                ),
                "latency_batch": fmt_batch_latency(row, summary),
                # The batch-latency column's title: the one batch size measured, or "batch".
                "batch_title": title,
                "accuracy": fmt_pct(row["accuracy"]),
                "verdict": None if verdict is None else not record.rejected,
                "verdict_reason": row["verdict_reason"],
                "duration": "-" if row["duration_s"] is None else f"{row['duration_s']:.1f} s",
            }
        )
    return rows


def job_headline(job: JobRecord, records: list[StepRecord]) -> dict[str, Any]:
    """The jobs list's columns: size reduction, accuracy change and gate verdicts."""
    ordered = sorted(records, key=lambda r: r.index)
    sizes = [r.output_size for r in ordered if r.output_size is not None]
    first_input = ordered[0].input_size if ordered else None
    baseline = first_input if isinstance(first_input, int) and first_input > 0 else None
    if baseline is None and sizes:
        baseline = sizes[0]
    reduction = None
    if baseline and sizes:
        reduction = baseline / sizes[-1] if sizes[-1] else None
    accuracies = [a for a in (summary_row(r)["accuracy"] for r in ordered) if a is not None]
    delta = (accuracies[-1] - accuracies[0]) * 100 if len(accuracies) >= 2 else None
    gates = [
        {"step": r.step, "passed": not r.rejected, "reason": r.verdict.get("reason")}
        for r in ordered
        if r.verdict
    ]
    return {
        "profile": job.profile_name,
        "size_reduction": None if reduction is None else f"{reduction:.2f}x",
        "size_final": fmt_size(sizes[-1]) if sizes else "-",
        "accuracy_delta": None if delta is None else f"{delta:+.2f} pt",
        "gates": gates,
    }
