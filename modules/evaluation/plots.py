"""Trade-off plots as PNG and SVG bytes (matplotlib, Agg canvas, no pyplot state).

Every plot takes plain row dicts, the same ones the sweep, auto and report tables hold:
`label`, `size_bytes`, `accuracy` (0..1), `latency_ms` (batch-1 median), `latency_ci95`,
`energy_mj_estimate`, `sparsity`, `memory_bytes`, and whatever x value is plotted.
Missing values are skipped, so a partial table still draws.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

# The Agg canvas drawn directly, without pyplot: no display needed, no global figure state,
# safe in worker threads.
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

Row = Mapping[str, Any]
# Fixed SVG ids and no timestamps: the same table gives the same bytes.
_SVG_META = {"Date": None}
matplotlib.rcParams["svg.hashsalt"] = "mcaas"


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _pairs(rows: Sequence[Row], x: str, y: str) -> tuple[list[float], list[float], list[int]]:
    xs, ys, idx = [], [], []
    for i, row in enumerate(rows):
        xv, yv = _num(row.get(x)), _num(row.get(y))
        if xv is not None and yv is not None:
            xs.append(xv)
            ys.append(yv)
            idx.append(i)
    return xs, ys, idx


def render(fig: Figure) -> dict[str, bytes]:
    """The figure as {"png": bytes, "svg": bytes}."""
    FigureCanvasAgg(fig)
    out = {}
    for fmt in ("png", "svg"):
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=110, metadata=_SVG_META if fmt == "svg" else None)
        out[fmt] = buf.getvalue()
    return out


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")


def tradeoff_figure(rows: Sequence[Row], *, x: str = "sparsity", x_label: str = "") -> Figure:
    """x (e.g. sparsity) vs accuracy, batch-1 latency (with 95% CI) and energy (estimate)."""
    fig = Figure(figsize=(12, 3.6), layout="constrained")
    panels = (
        ("accuracy", "test accuracy"),
        ("latency_ms", "batch-1 latency, ms (median, 95% CI)"),
        ("energy_mj_estimate", "energy / inference, mJ (estimate)"),
    )
    for n, (key, label) in enumerate(panels, start=1):
        ax = fig.add_subplot(1, 3, n)
        xs, ys, idx = _pairs(rows, x, key)
        if not xs:
            _empty(ax, f"no {key}")
        else:
            order = sorted(range(len(xs)), key=lambda i: xs[i])
            ax.plot([xs[i] for i in order], [ys[i] for i in order], marker="o")
            if key == "latency_ms":
                for xv, i in zip(xs, idx, strict=True):
                    ci = rows[i].get("latency_ci95")
                    if ci and all(_num(c) is not None for c in ci):
                        ax.vlines(xv, ci[0], ci[1], color="tab:blue", alpha=0.5)
        ax.set_xlabel(x_label or x)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{x_label or x} vs accuracy, latency and energy (estimate)")
    return fig


def resource_figure(rows: Sequence[Row], *, resources: Sequence[tuple[str, str]] = ()) -> Figure:
    """Accuracy against each resource (size, memory, latency by default)."""
    resources = resources or (
        ("size_bytes", "serialized size, KB"),
        ("memory_bytes", "batch-1 memory, KB"),
        ("latency_ms", "batch-1 latency, ms"),
    )
    fig = Figure(figsize=(4 * len(resources), 3.6), layout="constrained")
    for n, (key, label) in enumerate(resources, start=1):
        ax = fig.add_subplot(1, len(resources), n)
        xs, ys, idx = _pairs(rows, key, "accuracy")
        if not xs:
            _empty(ax, f"no {key}")
        else:
            scale = 1e3 if key.endswith("bytes") else 1.0
            ax.scatter([v / scale for v in xs], ys)
            for xv, yv, i in zip(xs, ys, idx, strict=True):
                ax.annotate(str(rows[i].get("label", i)), (xv / scale, yv), fontsize=7)
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    fig.suptitle("resource vs accuracy")
    return fig


def pareto_figure(rows: Sequence[Row], front: Sequence[int]) -> Figure:
    """Size and latency against accuracy, the Pareto front highlighted."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    on_front = set(front)
    for n, (key, label, scale) in enumerate(
        (("size_bytes", "serialized size, KB", 1e3), ("latency_ms", "batch-1 latency, ms", 1.0)),
        start=1,
    ):
        ax = fig.add_subplot(1, 2, n)
        xs, ys, idx = _pairs(rows, key, "accuracy")
        if not xs:
            _empty(ax, f"no {key}")
        else:
            colors = ["tab:red" if i in on_front else "tab:gray" for i in idx]
            ax.scatter([v / scale for v in xs], ys, c=colors)
            triples = zip(xs, ys, idx, strict=True)
            pts = sorted((x / scale, y) for x, y, i in triples if i in on_front)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color="tab:red", alpha=0.6)
            for xv, yv, i in zip(xs, ys, idx, strict=True):
                ax.annotate(str(rows[i].get("label", i)), (xv / scale, yv), fontsize=7)
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    fig.suptitle("Pareto front over (size, latency, accuracy): red = on the front")
    return fig


def waterfall_figure(rows: Sequence[Row]) -> Figure:
    """Per-step waterfall of model size and batch-1 latency: each bar is one step's change."""
    fig = Figure(figsize=(11, 4), layout="constrained")
    for n, (key, label, scale) in enumerate(
        (("size_bytes", "model size, KB", 1e3), ("latency_ms", "batch-1 latency, ms", 1.0)),
        start=1,
    ):
        ax = fig.add_subplot(1, 2, n)
        points: list[tuple[str, float]] = []
        for i, r in enumerate(rows):
            value = _num(r.get(key))
            if value is not None:
                points.append((f"{r.get('index', i)}:{r.get('step', '')}", value / scale))
        if not points:
            _empty(ax, f"no step measured {key}")
        previous = 0.0
        for pos, (_name, value) in enumerate(points):
            base, delta = (0.0, value) if pos == 0 else (previous, value - previous)
            color = "tab:blue" if pos == 0 else ("tab:green" if delta <= 0 else "tab:red")
            ax.bar(pos, delta, bottom=base, color=color)
            ax.annotate(f"{value:.3g}", (pos, value), ha="center", va="bottom", fontsize=7)
            previous = value
        ax.set_xticks(range(len(points)), [p[0] for p in points], rotation=30, ha="right")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("per-step waterfall (green: the step reduced it, red: increased)")
    return fig


def budget_figure(rows: Sequence[Row]) -> Figure:
    """Budget sweep: auto-batch over memory budget x compute scale, and estimated latency."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    mems = sorted({float(r["memory_budget_mb"]) for r in rows})
    scales = sorted({float(r["compute_scale"]) for r in rows})
    ax = fig.add_subplot(1, 2, 1)
    grid = [[math.nan] * len(mems) for _ in scales]
    for r in rows:
        batch = r.get("auto_batch")
        grid[scales.index(float(r["compute_scale"]))][mems.index(float(r["memory_budget_mb"]))] = (
            math.log2(batch) if batch else -1.0
        )
    image = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(mems)), [f"{m:g}" for m in mems])
    ax.set_yticks(range(len(scales)), [f"{s:g}" for s in scales])
    ax.set_xlabel("memory budget, MB")
    ax.set_ylabel("compute scale")
    fig.colorbar(image, ax=ax, label="log2(auto-batch); -1 = does not run")
    ax2 = fig.add_subplot(1, 2, 2)
    by_scale: dict[float, float] = {}
    for r in rows:
        value = _num(r.get("estimated_latency_ms"))
        if value is not None:
            by_scale[float(r["compute_scale"])] = value
    if by_scale:
        xs = sorted(by_scale)
        ax2.plot(xs, [by_scale[x] for x in xs], marker="o")
    else:
        _empty(ax2, "no latency")
    ax2.set_xlabel("compute scale")
    ax2.set_ylabel("estimated batch-1 latency, ms (estimate)")
    ax2.grid(alpha=0.3)
    fig.suptitle("hardware-budget sweep")
    return fig


def layer_figure(rows: Sequence[Row], *, top: int = 40) -> Figure:
    """Per-layer bars from a profile table: parameters and latency (median, 95% CI).

    Only the `top` layers with the most parameters or time are drawn (the table has all).
    scikit-learn tables, which have no latency, draw their bytes instead.
    """
    time_key = "latency_ms" if any(_num(r.get("latency_ms")) is not None for r in rows) else None
    second = time_key or "bytes"
    ranked = sorted(
        range(len(rows)),
        key=lambda i: (
            -max(
                float(rows[i].get("params_share") or 0.0),
                float(rows[i].get("latency_share") or rows[i].get("bytes_share") or 0.0),
            )
        ),
    )
    keep = sorted(ranked[:top])
    shown = [rows[i] for i in keep]
    names = [str(r.get("name", i)) for i, r in zip(keep, shown, strict=True)]
    fig = Figure(figsize=(11, max(3.0, 0.28 * len(shown) + 1.4)), layout="constrained")
    panels = (
        ("params", "parameters (and buffers)"),
        (second, "latency per layer, ms (median, 95% CI)" if time_key else "bytes"),
    )
    for n, (key, label) in enumerate(panels, start=1):
        ax = fig.add_subplot(1, 2, n)
        values = [_num(r.get(key)) or 0.0 for r in shown]
        if not shown:
            _empty(ax, "no layers")
        else:
            pos = list(range(len(shown)))
            ax.barh(pos, values, color="tab:blue" if n == 1 else "tab:orange")
            if key == "latency_ms":
                for y, r in zip(pos, shown, strict=True):
                    ci = r.get("latency_ci95")
                    if ci and all(_num(c) is not None for c in ci):
                        ax.hlines(y, ci[0], ci[1], color="black", alpha=0.6)
            ax.set_yticks(pos, names if n == 1 else [""] * len(pos), fontsize=7)
            ax.invert_yaxis()
        ax.set_xlabel(label)
        ax.grid(alpha=0.3, axis="x")
    hidden = len(rows) - len(shown)
    more = f" ({hidden} smaller layers not drawn)" if hidden > 0 else ""
    fig.suptitle(f"per-layer profile{more}; latency from hooks: relative, with overhead")
    return fig


def sensitivity_figure(rows: Sequence[Row]) -> Figure:
    """Accuracy drop per layer against the level, one line per layer (one-layer-at-a-time)."""
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    layers: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        level, drop = _num(r.get("level")), _num(r.get("accuracy_drop_pt"))
        if level is not None and drop is not None:
            layers.setdefault(str(r.get("layer")), []).append((level, drop))
    if not layers:
        _empty(ax, "no sensitivity rows")
    for name, points in layers.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    if layers:
        ax.legend(fontsize=7, ncol=2)
    ax.set_xlabel("level (amount removed, or share of rank kept for lowrank)")
    ax.set_ylabel("accuracy drop, percentage points")
    ax.grid(alpha=0.3)
    fig.suptitle("sensitivity: one layer compressed at a time, no fine-tuning")
    return fig
