import numpy as np
import pytest
from scipy import stats as sps

from modules.errors import BadInputError
from modules.evaluation.repeat import flatten_numbers, repeat_runs, seed_schedule


def test_seed_schedule_is_deterministic_distinct_and_starts_at_the_base():
    a = seed_schedule(7, 10)
    assert a == seed_schedule(7, 10)
    assert a[0] == 7 and len(set(a)) == 10
    assert all(0 <= s < 2**31 for s in a)
    assert seed_schedule(7, 3) == a[:3]  # a longer schedule extends a shorter one
    assert seed_schedule(8, 3) != a[:3]
    with pytest.raises(BadInputError, match="repeats"):
        seed_schedule(0, 0)
    with pytest.raises(BadInputError, match="seed"):
        seed_schedule(-1, 2)


def test_repeat_runs_ci_matches_scipy_on_known_samples():
    # fn returns a known value per seed position, so the summary is checkable by hand.
    known = [9.8, 10.4, 10.1, 9.7, 10.6, 10.0]
    samples = dict(zip(seed_schedule(3, 6), known, strict=True))
    result = repeat_runs(lambda seed: {"accuracy": samples[seed], "name": "x"}, 6, 3)
    stat = result["metrics"]["accuracy"]
    values = np.array(list(samples.values()))
    lo, hi = sps.t.interval(0.95, df=5, loc=values.mean(), scale=sps.sem(values))
    assert stat["n"] == 6 == result["n"]
    assert stat["mean"] == pytest.approx(values.mean())
    assert stat["std"] == pytest.approx(values.std(ddof=1))
    assert stat["ci95"] == pytest.approx([lo, hi])
    assert result["seeds"] == seed_schedule(3, 6)
    assert "name" not in result["metrics"]  # only numbers are summarized


def test_nested_metrics_flatten_and_stats_give_their_median():
    stat = {"mean": 2.0, "median": 1.5, "ci95": [1, 3], "n": 3}
    flat = flatten_numbers({"latency_ms": {"b1": stat}, "acc": 0.5, "ok": True, "s": "x"})
    assert flat == {"latency_ms.b1": 1.5, "acc": 0.5}
