import math

import pytest

from modules.evaluation.plots import (
    budget_figure,
    pareto_figure,
    render,
    resource_figure,
    tradeoff_figure,
    waterfall_figure,
)

ROWS = [
    {
        "label": "input",
        "value": None,
        "sparsity": 0.0,
        "size_bytes": 200_000,
        "accuracy": 0.97,
        "latency_ms": 0.07,
        "latency_ci95": [0.06, 0.08],
        "energy_mj_estimate": 0.19,
        "memory_bytes": 210_000,
    },
    {
        "label": "a=0.5",
        "value": 0.5,
        "sparsity": 0.5,
        "size_bytes": 70_000,
        "accuracy": 0.96,
        "latency_ms": 0.04,
        "latency_ci95": [0.035, 0.045],
        "energy_mj_estimate": 0.1,
        "memory_bytes": 80_000,
    },
    {"label": "failed", "value": 0.9, "error": "boom"},
]


@pytest.mark.parametrize(
    "figure",
    [
        lambda: tradeoff_figure(ROWS, x="sparsity"),
        lambda: resource_figure(ROWS),
        lambda: pareto_figure(ROWS, [0, 1]),
        lambda: waterfall_figure(
            [
                {"index": 0, "step": "train", "size_bytes": 200_000, "latency_ms": None},
                {"index": 1, "step": "prune", "size_bytes": 70_000, "latency_ms": 0.04},
                {"index": 2, "step": "export", "size_bytes": 90_000, "latency_ms": math.nan},
            ]
        ),
        lambda: budget_figure(
            [
                {
                    "memory_budget_mb": m,
                    "compute_scale": s,
                    "auto_batch": b,
                    "estimated_latency_ms": 0.1 / s,
                }
                for m, b in ((0.25, None), (8, 512))
                for s in (0.5, 1.0)
            ]
        ),
    ],
)
def test_each_plot_renders_png_and_svg(figure):
    out = render(figure())
    assert out["png"].startswith(b"\x89PNG\r\n\x1a\n") and len(out["png"]) > 5_000
    assert b"<svg" in out["svg"][:1_000]


def test_svg_bytes_are_reproducible():
    assert render(pareto_figure(ROWS, [1]))["svg"] == render(pareto_figure(ROWS, [1]))["svg"]


def test_empty_tables_still_draw():
    assert render(tradeoff_figure([], x="sparsity"))["png"].startswith(b"\x89PNG")
    assert render(waterfall_figure([]))["png"].startswith(b"\x89PNG")
