"""The summary row carries the noisy flag, and every face prints the same visible mark."""

from io import StringIO

from rich.console import Console

from modules.cli import summary_table
from modules.deployment.report import render_html
from modules.evaluation.summary import (
    NOISY_MARK,
    batch_column_title,
    fmt_batch_latency,
    fmt_latency,
    job_report,
    summary_csv,
    summary_row,
)


def _latency(median: float, lo: float, hi: float, *, noisy: bool) -> dict:
    return {
        "mean": median,
        "median": median,
        "median_ci95": [lo, hi],
        "ci95": [lo, hi],
        "std": 0.0,
        "min": lo,
        "max": hi,
        "n": 40,
        "noisy": noisy,
        "target_met": not noisy,
    }


def _record(batch: int = 64, index: int = 0) -> dict:
    return {
        "job_id": "j",
        "index": index,
        "step": "measure",
        "output_framework": "torch",
        "output_size": 21_800,
        "metrics": {
            "accuracy": 0.97,
            "latency_ms": {
                "b1": _latency(0.05, 0.046, 21.049, noisy=True),
                f"b{batch}": _latency(0.4, 0.39, 0.41, noisy=False),
            },
        },
        "verdict": None,
    }


def test_summary_row_keeps_the_noisy_flag_per_batch_size() -> None:
    row = summary_row(_record())
    assert row["latency_b1_noisy"] is True and row["latency_batch_noisy"] is False
    assert row["latency_b1_ci95"] == [0.046, 21.049]


def test_the_batch_column_shows_the_batch_size_actually_measured() -> None:
    row = summary_row(_record(batch=32))
    assert row["latency_batch"] == 32 and row["latency_batch_ms"] == 0.4
    assert batch_column_title([row]) == "b32"
    assert fmt_batch_latency(row, [row]) == "0.400 [0.390, 0.410]"
    # Steps that timed different batch sizes: a neutral title, each cell names its size.
    rows = [row, summary_row(_record(batch=256, index=1))]
    assert batch_column_title(rows) == "batch"
    assert fmt_batch_latency(rows[1], rows) == "b256: 0.400 [0.390, 0.410]"
    header, first, _ = summary_csv(rows).splitlines()
    columns = header.split(",")
    assert "latency_b64_ms" not in columns
    assert dict(zip(columns, first.split(","), strict=True))["latency_batch"] == "32"
    out = StringIO()
    Console(file=out, width=250).print(summary_table("t", rows))
    assert "batch ms" in out.getvalue() and "b256: 0.400" in out.getvalue()


def test_a_parity_steps_checked_batch_sizes_and_a_searchs_stop_reason_are_columns() -> None:
    record = _record()
    record["metrics"] |= {"batch_sizes": [1, 64], "stop_reason": "cannot_beat_best"}
    row = summary_row(record)
    assert row["parity_batch_sizes"] == [1, 64] and row["stop_reason"] == "cannot_beat_best"
    header, line = summary_csv([row]).splitlines()
    cells = dict(zip(header.split(","), line.split(","), strict=True))
    assert cells["parity_batch_sizes"] == "1;64" and cells["stop_reason"] == "cannot_beat_best"


def test_fmt_latency_marks_only_a_noisy_figure() -> None:
    assert fmt_latency(0.05, [0.046, 21.049], True) == f"0.050 [0.046, 21.049] {NOISY_MARK}"
    assert fmt_latency(0.4, [0.39, 0.41], False) == "0.400 [0.390, 0.410]"
    assert fmt_latency(None, None, True) == "-"


def test_cli_table_and_report_html_show_the_mark() -> None:
    row = summary_row(_record())
    out = StringIO()
    Console(file=out, width=200).print(summary_table("t", [row]))
    table_text = out.getvalue()
    assert table_text.count(NOISY_MARK) == 2  # the b1 cell and the caption's key
    report = job_report(spec={"job_id": "j"}, status="COMPLETED", reason=None, records=[_record()])
    html = render_html(report, {}, title="t", this_index=1, this_step="report")
    assert f"0.050 [0.046, 21.049] {NOISY_MARK}" in html
    assert f"0.400 [0.390, 0.410] {NOISY_MARK}" not in html
