"""The Pareto front of candidates over (size, latency) to minimize and accuracy to maximize.

Point a dominates point b when a is no worse on every objective and strictly better on
at least one. The front is every point no other point dominates; equal points do not
dominate each other, so duplicates stay together. A point missing any objective (None
or NaN: e.g. a candidate that failed) cannot be compared and is never on the front.

A measured objective with a 95% CI (latency: `latency_ci95` beside `latency_ms`) is
compared by its interval: a is better than b only when a's interval lies wholly below b's;
overlapping intervals are no measurable difference, a tie, so timing noise alone never
pushes a candidate off the front.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

DEFAULT_MINIMIZE = ("size_bytes", "latency_ms")
DEFAULT_MAXIMIZE = ("accuracy",)
# objective -> the key of its 95% CI [low, high] in the same point
DEFAULT_INTERVALS: Mapping[str, str] = {"latency_ms": "latency_ci95"}


def _finite(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def _interval(point: Mapping[str, Any], key: str | None) -> tuple[float, float] | None:
    value = point.get(key) if key else None
    if isinstance(value, list | tuple) and len(value) == 2 and all(_finite(v) for v in value):
        return float(value[0]), float(value[1])
    return None


def _order(a: Mapping[str, Any], b: Mapping[str, Any], key: str, ci_key: str | None) -> int:
    """-1 when a is smaller on `key`, 1 when larger, 0 when equal or not measurably apart."""
    ia, ib = _interval(a, ci_key), _interval(b, ci_key)
    if ia is not None and ib is not None:
        if ia[1] < ib[0]:
            return -1
        if ia[0] > ib[1]:
            return 1
        return 0
    x, y = float(a[key]), float(b[key])
    return (x > y) - (x < y)


def dominates(
    a: Mapping[str, Any],
    b: Mapping[str, Any],
    *,
    minimize: Sequence[str] = DEFAULT_MINIMIZE,
    maximize: Sequence[str] = DEFAULT_MAXIMIZE,
    intervals: Mapping[str, str] = DEFAULT_INTERVALS,
) -> bool:
    """True when a is no worse than b on every objective and better on at least one."""
    orders = [_order(a, b, k, intervals.get(k)) for k in minimize]
    orders += [-_order(a, b, k, intervals.get(k)) for k in maximize]
    return all(o <= 0 for o in orders) and any(o < 0 for o in orders)


def pareto_front(
    points: Sequence[Mapping[str, Any]],
    *,
    minimize: Sequence[str] = DEFAULT_MINIMIZE,
    maximize: Sequence[str] = DEFAULT_MAXIMIZE,
    intervals: Mapping[str, str] = DEFAULT_INTERVALS,
) -> list[int]:
    """Indices (in input order) of the points no other point dominates."""
    if not minimize and not maximize:
        raise ValueError("pareto_front needs at least one objective")
    objectives = (*minimize, *maximize)
    usable = [all(_finite(p.get(k)) for k in objectives) for p in points]
    front = []
    for i, point in enumerate(points):
        if not usable[i]:
            continue
        beaten = any(
            usable[j]
            and dominates(other, point, minimize=minimize, maximize=maximize, intervals=intervals)
            for j, other in enumerate(points)
            if j != i
        )
        if not beaten:
            front.append(i)
    return front


def tradeoff_x(rows: Sequence[dict[str, Any]], param: str) -> tuple[str, str]:
    """Plot against sparsity when it varies, else against the swept value."""
    sparsities = {round(float(r["sparsity"]), 6) for r in rows if r.get("sparsity") is not None}
    if len(sparsities) > 1:
        return "sparsity", "sparsity (share of zero weights)"
    return "value", param
