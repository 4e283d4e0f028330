import numpy as np
import pytest
from scipy import stats as sps

from modules.evaluation.stats import median_interval, point, summarize, t_interval


def test_summary_matches_scipy_on_known_normal_sample():
    rng = np.random.default_rng(0)
    samples = rng.normal(loc=10.0, scale=2.0, size=40)
    s = summarize(samples, unit="ms")
    lo, hi = sps.t.interval(0.95, df=39, loc=samples.mean(), scale=sps.sem(samples))
    assert s["n"] == 40 and s["unit"] == "ms"
    assert s["mean"] == pytest.approx(samples.mean())
    assert s["median"] == pytest.approx(np.median(samples))
    assert s["std"] == pytest.approx(samples.std(ddof=1))
    assert s["ci95"] == pytest.approx([lo, hi])
    # The true mean of the distribution lies inside this sample's interval.
    assert lo < 10.0 < hi


def test_interval_coverage_is_about_95_percent():
    rng = np.random.default_rng(1)
    hits = 0
    for _ in range(2000):
        lo, hi = t_interval(rng.exponential(scale=3.0, size=30))
        hits += lo < 3.0 < hi
    # Skewed data makes t slightly under-cover; a broken formula lands far from 0.95.
    assert 0.90 < hits / 2000 < 0.97


def test_known_small_sample_by_hand():
    s = summarize([1.0, 2.0, 3.0])
    half = sps.t.ppf(0.975, 2) * 1.0 / np.sqrt(3)
    assert s["ci95"] == pytest.approx([2 - half, 2 + half])


def test_single_sample_and_empty():
    assert summarize([5.0])["ci95"] == [5.0, 5.0]
    with pytest.raises(ValueError):
        summarize([])


def test_point():
    assert point(summarize([1.0, 3.0])) == 2.0
    assert point(0.5) == 0.5
    assert point("x") is None


def test_median_interval_covers_true_median_about_95_percent():
    rng = np.random.default_rng(2)
    true_median = np.log(2) * 3.0  # exponential(scale=3)
    hits = 0
    for _ in range(2000):
        lo, hi = median_interval(rng.exponential(scale=3.0, size=30))
        hits += lo <= true_median <= hi
    # Order-statistic intervals are conservative: coverage is at least 95%.
    assert 0.94 < hits / 2000 < 0.995


def test_median_interval_contains_sample_median_and_is_order_statistics():
    samples = list(range(1, 31))  # 1..30
    lo, hi = median_interval(samples)
    assert lo <= np.median(samples) <= hi
    # For n=30, the 95% binomial interval is [x_(10), x_(21)].
    assert (lo, hi) == (10.0, 21.0)
    assert summarize(samples)["median_ci95"] == [10.0, 21.0]
