"""What the dashboard shows, computed from job and step records (plain data, no HTML)."""

from __future__ import annotations

from typing import Any

from modules.core.records import JobRecord, StepRecord
from modules.evaluation.summary import (
    NOISY_MARK,
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


def _fmt_speedup(compared: Any) -> str:
    """compare_latency's verdict on input vs winner, as the page says it."""
    if not isinstance(compared, dict):
        return "-"
    ratio = compared.get("ratio")
    if not isinstance(ratio, int | float) or not compared.get("measurable"):
        return str(compared.get("note") or "no measurable difference")
    text = f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"
    return f"{text} {NOISY_MARK}" if compared.get("noisy") else text


def _as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def compress_outcome(records: list[StepRecord], artifacts: list[Any]) -> dict[str, Any] | None:
    """The last `compress` step's goal, outcome and winner, with the keys of its handed-back
    files (model.onnx, report.html, compress.json...); None when the job has no such step."""
    found = [r for r in records if r.step == "compress"]
    if not found:
        return None
    record = max(found, key=lambda r: r.index)
    m = record.metrics
    mine = [a for a in artifacts if a.index == record.index]
    winner = m.get("winner") or None
    winner = _as_dict(winner) if winner is not None else None
    unit = "%" if m.get("drop_kind") == "relative" else "pt"
    elapsed = m.get("elapsed_s")
    out: dict[str, Any] = {
        "index": record.index,
        "met": bool(m.get("met_goal")),
        "reason": m.get("reason") or (record.verdict or {}).get("reason") or "",
        "goal": {
            "profile": m.get("profile") or record.profile or "-",
            "max_drop": f"{m.get('max_drop')} {unit} ({m.get('drop_kind') or 'absolute'})",
            "objective": m.get("objective") or "-",
        },
        "candidates": m.get("n_candidates"),
        "gated": m.get("n_gated"),
        "elapsed": f"{elapsed:.1f} s" if isinstance(elapsed, int | float) else "-",
        "stopped_by": m.get("stopped_by") or "-",
        "winner": None,
        # The ONNX the step stored: the winner's, or the best-so-far's when the goal was missed.
        "model": next((a for a in mine if a.kind == "model"), None),
        "files": {a.name: a for a in mine if a.kind == "file"},
    }
    if winner is not None:
        baseline = _as_dict(m.get("baseline"))
        parity = _as_dict(winner.get("parity"))
        ratio = winner.get("size_ratio")
        drop = winner.get("drop_pt")
        out["winner"] = {
            "label": str(winner.get("label") or "-"),
            "size": fmt_size(winner.get("size_bytes")),
            "size_ratio": f"{ratio:.1f}x" if isinstance(ratio, int | float) else "-",
            "accuracy": fmt_pct(winner.get("accuracy")),
            "input_accuracy": fmt_pct(baseline.get("accuracy")),
            # drop_pt is input minus winner; the page shows the change, so a gain reads "+".
            "change": f"{-drop:+.2f} pt" if isinstance(drop, int | float) else "-",
            "latency": fmt_latency(winner.get("latency_ms"), winner.get("latency_ci95")),
            "vs_input": _fmt_speedup(winner.get("latency_vs_input")),
            "parity": None if not parity else bool(parity.get("passed")),
            "parity_reason": str(parity.get("reason") or ""),
        }
    return out
