import math

import pytest

from modules.evaluation.pareto import dominates, pareto_front


def pt(size, latency, accuracy):
    return {"size_bytes": size, "latency_ms": latency, "accuracy": accuracy}


def test_front_of_a_hand_made_set():
    points = [
        pt(100, 1.0, 0.90),  # 0: on the front (smallest, fastest)
        pt(200, 2.0, 0.95),  # 1: on the front (more accurate)
        pt(200, 2.0, 0.94),  # 2: dominated by 1
        pt(300, 1.5, 0.95),  # 3: dominated by 1 (bigger, same accuracy) - but faster than 1
        pt(400, 3.0, 0.99),  # 4: on the front (most accurate)
        pt(150, 0.5, 0.80),  # 5: on the front (fastest)
        pt(500, 4.0, 0.50),  # 6: dominated by everything
    ]
    # 3 is faster than 1 (1.5 < 2.0), so 1 does not dominate it; nothing else does either.
    assert pareto_front(points) == [0, 1, 3, 4, 5]


def test_duplicates_stay_and_missing_values_drop_out():
    points = [pt(1, 1, 0.9), pt(1, 1, 0.9), pt(None, 1, 0.99), pt(1, math.nan, 0.99)]
    assert pareto_front(points) == [0, 1]


def test_custom_objectives():
    points = [{"a": 1, "b": 5}, {"a": 2, "b": 6}, {"a": 0, "b": 1}]
    assert pareto_front(points, minimize=("a",), maximize=()) == [2]
    assert pareto_front(points, minimize=(), maximize=("b",)) == [1]
    with pytest.raises(ValueError):
        pareto_front(points, minimize=(), maximize=())


def test_dominates_is_strict():
    assert dominates(pt(1, 1, 0.9), pt(1, 2, 0.9))
    assert not dominates(pt(1, 1, 0.9), pt(1, 1, 0.9))
    assert not dominates(pt(0, 2, 0.9), pt(1, 1, 0.9))


def timed(size, latency, ci, accuracy=0.9):
    return {**pt(size, latency, accuracy), "latency_ci95": list(ci)}


def test_latency_within_overlapping_cis_is_a_tie_not_a_win():
    # 1 is smaller; 0 looks 3x faster, but its CI overlaps 1's: no measurable difference.
    points = [timed(200, 0.05, (0.04, 21.0)), timed(100, 0.15, (0.1, 0.2))]
    assert dominates(points[1], points[0])
    assert pareto_front(points) == [1]


def test_latency_with_separate_cis_still_counts():
    points = [timed(200, 0.05, (0.04, 0.06)), timed(100, 0.15, (0.1, 0.2))]
    assert not dominates(points[1], points[0])
    assert pareto_front(points) == [0, 1]


def test_overlap_never_makes_the_slower_point_dominate_on_latency_alone():
    # Same size and accuracy; only latency differs, within noise: neither dominates.
    points = [timed(100, 1.0, (0.5, 1.6)), timed(100, 1.5, (1.2, 1.9))]
    assert pareto_front(points) == [0, 1]
    assert pareto_front(points, intervals={}) == [0]  # by the medians alone, 0 wins
