"""The job page's plots, drawn from the step records on request (PNG bytes).

The same figure functions as the `report` step (modules/evaluation/plots.py), so a job
without a report step still gets its plots. Points: every step that measured size,
latency and accuracy, plus every candidate of a sweep, auto or compress step. matplotlib is imported
only when a plot is drawn; torch never is.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from modules.core.records import StepRecord
from modules.errors import NotFoundError
from modules.evaluation.summary import summary_row

PLOTS = {
    "pareto": "Pareto front: size and latency against accuracy",
    "waterfall": "Size and latency waterfall, step by step",
    "sparsity": "Sparsity (or, when it does not vary, parameters) against accuracy and latency",
}


# Meta-steps whose metrics list every candidate they tried (`rows`): each is a point too.
CANDIDATE_STEPS = {"sweep", "auto", "compress"}


def _step_points(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    points = []
    for record in records:
        row = summary_row(record)
        metrics = record.get("metrics") or {}
        points.append(
            {
                "label": f"{row['index']}:{row['step']}",
                "index": row["index"],
                "step": row["step"],
                "size_bytes": row["size_bytes"],
                "latency_ms": row["latency_b1_ms"],
                "latency_ci95": row["latency_b1_ci95"],
                "accuracy": row["accuracy"],
                "sparsity": metrics.get("sparsity"),
                "params": row["params"],
                "energy_mj_estimate": row["energy_mj_estimate"],
            }
        )
    return points


def _candidate_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for record in records:
        if record["step"] in CANDIDATE_STEPS:
            metrics = record.get("metrics") or {}
            rows += [
                r for r in metrics.get("rows") or [] if isinstance(r, dict) and not r.get("error")
            ]
    return rows


def plot_points(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The rows each plot draws."""
    ordered = sorted(records, key=lambda r: int(r["index"]))
    steps = _step_points(ordered)
    candidates = _candidate_rows(ordered)
    points = [p for p in steps if p["accuracy"] is not None] + candidates
    x = sparsity_x(points)
    return {
        "waterfall": steps,
        "pareto": points,
        "sparsity": [p for p in points if p.get(x) is not None],
    }


def sparsity_x(rows: list[dict[str, Any]]) -> str:
    """Plot against sparsity when it varies; structured pruning keeps it at 0, so use params."""
    values = {round(float(r["sparsity"]), 6) for r in rows if r.get("sparsity") is not None}
    return "sparsity" if len(values) > 1 else "params"


@functools.lru_cache(maxsize=64)
def _cached_png(name: str, records_json: str) -> bytes:
    import json

    from modules.evaluation.pareto import pareto_front
    from modules.evaluation.plots import pareto_figure, render, tradeoff_figure, waterfall_figure

    rows = plot_points(json.loads(records_json))[name]
    if name == "waterfall":
        figure = waterfall_figure(rows)
    elif name == "pareto":
        front = pareto_front(rows, minimize=("size_bytes", "latency_ms"), maximize=("accuracy",))
        figure = pareto_figure(rows, front)
    elif sparsity_x(rows) == "sparsity":
        figure = tradeoff_figure(rows, x="sparsity", x_label="sparsity (share of zero weights)")
    else:
        figure = tradeoff_figure(rows, x="params", x_label="parameters (sparsity does not vary)")
    return render(figure)["png"]


def plot_png(name: str, *, records: Sequence[StepRecord]) -> bytes:
    """One of PLOTS as PNG bytes, cached by the records drawn (a page reload redraws nothing)."""
    import json

    if name not in PLOTS:
        raise NotFoundError(f"plot {name!r} not found; one of {', '.join(PLOTS)}")
    dumped = [r.model_dump(mode="json") for r in records]
    return _cached_png(name, json.dumps(dumped, default=str, sort_keys=True))
