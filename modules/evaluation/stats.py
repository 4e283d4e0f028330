"""Summary statistics with a Student-t 95% confidence interval."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats as sps


def t_interval(samples: ArrayLike, *, confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided Student-t interval for the mean; degenerate (mean, mean) when n < 2."""
    arr = np.asarray(samples, dtype=np.float64)
    mean = float(arr.mean())
    if arr.size < 2:
        return mean, mean
    sem = float(arr.std(ddof=1)) / math.sqrt(arr.size)
    half = float(sps.t.ppf(0.5 + confidence / 2, df=arr.size - 1)) * sem
    return mean - half, mean + half


def median_interval(samples: ArrayLike, *, confidence: float = 0.95) -> tuple[float, float]:
    """Distribution-free CI for the median from binomial order statistics.

    Latency samples are skewed (a few slow runs), so the median is the headline number;
    this interval needs no normality assumption. With n < 6 it is (min, max).
    """
    arr = np.sort(np.asarray(samples, dtype=np.float64))
    n = arr.size
    if n < 6:
        return float(arr[0]), float(arr[-1])
    # Largest j with P(Binom(n, .5) < j) <= alpha/2; the interval is [x_(j), x_(n-j+1)].
    alpha = 1 - confidence
    j = int(sps.binom.ppf(alpha / 2, n, 0.5))
    j = max(j, 1)
    return float(arr[j - 1]), float(arr[n - j])


def summarize(samples: ArrayLike, *, unit: str = "") -> dict[str, Any]:
    """mean with its Student-t 95% CI, median with its order-statistic CI, std, min, max, n."""
    arr = np.asarray(samples, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("summarize() needs at least one sample")
    lo, hi = t_interval(arr)
    mlo, mhi = median_interval(arr)
    out: dict[str, Any] = {
        "mean": float(arr.mean()),
        "median": float(np.median(arr)),
        "median_ci95": [mlo, mhi],
        "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
        "min": float(arr.min()),
        "max": float(arr.max()),
        "ci95": [lo, hi],
        "n": int(arr.size),
    }
    if unit:
        out["unit"] = unit
    return out


def is_stat(value: Any) -> bool:
    """True for a dict made by summarize()."""
    return isinstance(value, dict) and {"mean", "ci95", "n"} <= value.keys()


def point(value: Any, *, key: str = "mean") -> float | None:
    """A single number from a plain number or a summarize() dict."""
    if is_stat(value):
        return float(value[key])
    if isinstance(value, int | float):
        return float(value)
    return None


NO_MEASURABLE_DIFFERENCE = "no measurable difference"


def compare_latency(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """a's median latency over b's, only where the medians' 95% CIs do not overlap.

    Overlapping CIs give ratio None and a note: a ratio of two medians the timing cannot
    tell apart is noise, however large it looks. `noisy` is true when either timing
    stopped short of its CI target; the CIs still decide.
    """
    a_lo, a_hi = a["median_ci95"]
    b_lo, b_hi = b["median_ci95"]
    noisy = bool(a.get("noisy") or b.get("noisy"))
    if a_hi < b_lo or b_hi < a_lo:
        b_median = float(b["median"])
        if b_median > 0:
            return {"ratio": float(a["median"]) / b_median, "measurable": True, "noisy": noisy}
    return {"ratio": None, "measurable": False, "note": NO_MEASURABLE_DIFFERENCE, "noisy": noisy}
