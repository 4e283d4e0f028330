"""The job report as data: every step record, the verdicts, the config, and a summary table."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from modules.core.records import StepRecord
from modules.evaluation.stats import point

NOISY_MARK = "(noisy)"


def fmt_latency(value: Any, ci: Any, noisy: Any = False) -> str:
    """A latency median with its 95% CI, marked when its CI never got tight (every face
    shows the same text: the CLI table, report.html and the dashboard)."""
    if not isinstance(value, int | float):
        return "-"
    text = f"{value:.3f}"
    if (
        isinstance(ci, list | tuple)
        and len(ci) == 2
        and all(isinstance(c, int | float) for c in ci)
    ):
        text += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
    return f"{text} {NOISY_MARK}" if noisy else text


def batch_timing(latency: dict[str, Any]) -> tuple[int | None, dict[str, Any] | None]:
    """The largest batch size above 1 a latency dict (keys b{size}) measured, and its stat."""
    sizes = [int(k[1:]) for k in latency if k[:1] == "b" and k[1:].isdigit() and k != "b1"]
    if not sizes:
        return None, None
    return max(sizes), latency[f"b{max(sizes)}"]


def batch_sizes_shown(rows: Sequence[dict[str, Any]]) -> list[int]:
    """The batch sizes of the rows' batch-latency column, each once."""
    return sorted({r["latency_batch"] for r in rows if r.get("latency_batch")})


def batch_column_title(rows: Sequence[dict[str, Any]]) -> str:
    """`b64` when every row measured the same batch size, else `batch` (cells say which)."""
    sizes = batch_sizes_shown(rows)
    return f"b{sizes[0]}" if len(sizes) == 1 else "batch"


def fmt_batch_latency(row: dict[str, Any], rows: Sequence[dict[str, Any]]) -> str:
    """The batch-latency cell; prefixed with its batch size when the rows measured several."""
    text = fmt_latency(
        row["latency_batch_ms"], row["latency_batch_ci95"], row["latency_batch_noisy"]
    )
    if text == "-" or len(batch_sizes_shown(rows)) <= 1:
        return text
    return f"b{row['latency_batch']}: {text}"


def summary_row(step: StepRecord | dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of one step record (None where the step did not measure them);
    a dict is a record as StepContext.history holds it."""
    record = StepRecord.of(step)
    metrics = record.metrics
    # hardware_sim and budget_gate name their timings measured_latency_ms.
    latency = metrics.get("latency_ms") or metrics.get("measured_latency_ms") or {}
    b1 = latency.get("b1")
    batch, big = batch_timing(latency)
    accuracy = metrics.get("accuracy", metrics.get("test_accuracy"))
    verdict = record.verdict
    return {
        "index": record.index,
        "step": record.step,
        "framework": record.output_framework,
        "size_bytes": metrics.get("size_bytes", record.output_size),
        "params": metrics.get("params"),
        "accuracy": point(accuracy),
        "latency_b1_ms": point(b1, key="median") if b1 else None,
        "latency_b1_ci95": b1.get("median_ci95", b1.get("ci95")) if b1 else None,
        "latency_b1_noisy": bool(b1.get("noisy")) if b1 else None,
        "latency_batch": batch,
        "latency_batch_ms": point(big, key="median") if big else None,
        "latency_batch_ci95": big.get("median_ci95", big.get("ci95")) if big else None,
        "latency_batch_noisy": bool(big.get("noisy")) if big else None,
        "verdict": None if verdict is None else ("REJECTED" if record.rejected else "pass"),
        "duration_s": record.duration_s,
        "output_key": record.output_key,
        **deployment_columns(metrics, verdict),
    }


def deployment_columns(metrics: dict[str, Any], verdict: dict[str, Any] | None) -> dict[str, Any]:
    """hardware_sim's estimates and the parity gate's numbers, where the step produced them."""
    estimated = (metrics.get("estimated_latency_ms") or {}).get("b1")
    energy = (metrics.get("energy_mj_per_inference_estimate") or {}).get("b1")
    return {
        "estimated_latency_b1_ms": point(estimated, key="median") if estimated else None,
        "energy_mj_estimate": point(energy, key="median") if energy else None,
        "fits": metrics.get("fits"),
        "auto_batch": metrics.get("auto_batch"),
        "agreement": metrics.get("agreement"),
        "max_abs_prob_diff": metrics.get("max_abs_prob_diff"),
        # The batch sizes a parity gate or int8 search compared outputs at.
        "parity_batch_sizes": metrics.get("batch_sizes"),
        "stop_reason": metrics.get("stop_reason"),
        "verdict_reason": verdict.get("reason") if verdict else None,
    }


SUMMARY_CSV_COLUMNS = (
    "index",
    "step",
    "framework",
    "size_bytes",
    "params",
    "accuracy",
    "latency_b1_ms",
    "latency_b1_ci95",
    "latency_b1_noisy",
    "latency_batch",
    "latency_batch_ms",
    "latency_batch_ci95",
    "latency_batch_noisy",
    "estimated_latency_b1_ms",
    "energy_mj_estimate",
    "fits",
    "auto_batch",
    "agreement",
    "max_abs_prob_diff",
    "parity_batch_sizes",
    "stop_reason",
    "verdict",
    "verdict_reason",
    "duration_s",
    "output_key",
)


def _csv_cell(value: Any) -> Any:
    return ";".join(f"{v:.6g}" for v in value) if isinstance(value, list) else value


def summary_csv(rows: list[dict[str, Any]]) -> str:
    """The summary table as CSV (CI pairs written as "lo;hi")."""
    buf = io.StringIO()
    writer = csv.DictWriter(
        buf, fieldnames=SUMMARY_CSV_COLUMNS, extrasaction="ignore", lineterminator="\n"
    )
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_cell(row.get(k)) for k in SUMMARY_CSV_COLUMNS})
    return buf.getvalue()


def job_report(
    *,
    spec: dict[str, Any],
    status: str,
    reason: str | None,
    records: Sequence[StepRecord | dict[str, Any]],
) -> dict[str, Any]:
    """report.json's content (a dict record is one as StepContext.history holds it)."""
    typed = [StepRecord.of(r) for r in records]
    steps = [r.model_dump(mode="json") for r in typed]
    return {
        "job_id": spec.get("job_id"),
        "user_id": spec.get("user_id"),
        "status": status,
        "reason": reason,
        "generated_at": datetime.now(UTC).isoformat(),
        "config": spec,
        "dataset": steps[0].get("dataset") if steps else None,
        "summary": [summary_row(r) for r in typed],
        "verdicts": [
            {"index": r.index, "step": r.step, **r.verdict} for r in typed if r.verdict is not None
        ],
        "steps": steps,
    }
