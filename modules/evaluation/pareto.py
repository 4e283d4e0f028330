"""The Pareto front of candidates over (size, latency) to minimize and accuracy to maximize.

Point a dominates point b when a is no worse on every objective and strictly better on
at least one. The front is every point no other point dominates; equal points do not
dominate each other, so duplicates stay together. A point missing any objective (None
or NaN: e.g. a candidate that failed) cannot be compared and is never on the front.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

DEFAULT_MINIMIZE = ("size_bytes", "latency_ms")
DEFAULT_MAXIMIZE = ("accuracy",)


def _vector(
    point: Mapping[str, Any], minimize: Sequence[str], maximize: Sequence[str]
) -> tuple[float, ...] | None:
    # Everything becomes "smaller is better" so one comparison serves both directions.
    values: list[float] = []
    for key, sign in [(k, 1.0) for k in minimize] + [(k, -1.0) for k in maximize]:
        value = point.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        if not math.isfinite(value):
            return None
        values.append(sign * float(value))
    return tuple(values)


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """True when a is <= b everywhere and < somewhere (all objectives minimized)."""
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(
        x < y for x, y in zip(a, b, strict=True)
    )


def pareto_front(
    points: Sequence[Mapping[str, Any]],
    *,
    minimize: Sequence[str] = DEFAULT_MINIMIZE,
    maximize: Sequence[str] = DEFAULT_MAXIMIZE,
) -> list[int]:
    """Indices (in input order) of the points no other point dominates."""
    if not minimize and not maximize:
        raise ValueError("pareto_front needs at least one objective")
    vectors = [_vector(p, minimize, maximize) for p in points]
    front = []
    for i, vi in enumerate(vectors):
        if vi is None:
            continue
        if not any(vj is not None and dominates(vj, vi) for j, vj in enumerate(vectors) if j != i):
            front.append(i)
    return front


def tradeoff_x(rows: Sequence[dict[str, Any]], param: str) -> tuple[str, str]:
    """Plot against sparsity when it varies, else against the swept value."""
    sparsities = {round(float(r["sparsity"]), 6) for r in rows if r.get("sparsity") is not None}
    if len(sparsities) > 1:
        return "sparsity", "sparsity (share of zero weights)"
    return "value", param
