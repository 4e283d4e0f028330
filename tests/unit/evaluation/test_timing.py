import time

import numpy as np
import pytest
from pydantic import ValidationError
from sklearn.tree import DecisionTreeClassifier

from modules.core.artifact import ModelArtifact
from modules.deployment.parity import ParityParams
from modules.evaluation.budget_gate import BudgetGateParams
from modules.evaluation.hardware_sim import HardwareSimParams
from modules.evaluation.measure import MeasureParams, measure_model, time_batches
from modules.evaluation.stats import compare_latency

TIMING_KEYS = {"ci_target", "ci_half_width_rel", "target_met", "noisy", "timing_s", "stopped_by"}


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_a_steady_function_meets_the_target_after_at_least_runs_samples():
    # A busy-wait lasts its length unless the OS preempts it: the median CI closes quickly.
    stat, samples = time_batches(
        lambda _x: _spin(200e-6), None, warmup=2, runs=10, ci_target=0.05, max_time_s=2.0
    )
    assert stat.keys() >= TIMING_KEYS and {"median", "median_ci95", "mean", "ci95"} <= stat.keys()
    assert stat["target_met"] is True and stat["noisy"] is False
    assert stat["stopped_by"] == "ci_target"
    assert stat["n"] == len(samples) >= 10
    assert stat["ci_half_width_rel"] <= 0.05
    lo, hi = stat["median_ci95"]
    assert stat["ci_half_width_rel"] == pytest.approx((hi - lo) / 2 / stat["median"])


def test_a_noisy_function_is_flagged_when_the_time_cap_stops_it():
    rng = np.random.default_rng(0)
    stat, samples = time_batches(
        lambda _x: time.sleep(rng.uniform(0, 0.005)),
        None,
        warmup=0,
        runs=5,
        ci_target=0.05,
        max_time_s=0.15,
    )
    assert stat["target_met"] is False and stat["noisy"] is True
    assert stat["stopped_by"] == "max_time_s" and stat["timing_s"] >= 0.15
    assert stat["n"] == len(samples) >= 5
    assert stat["ci_half_width_rel"] > 0.05


def test_the_sample_cap_and_a_zero_time_cap_bound_the_count():
    rng = np.random.default_rng(1)

    def jitter(_x: object) -> None:
        _spin(rng.uniform(0, 200e-6))

    capped, _ = time_batches(jitter, None, warmup=0, runs=5, max_time_s=5.0, max_samples=40)
    assert capped["n"] == 40 and capped["stopped_by"] == "max_samples" and capped["noisy"]
    # max_time_s=0 is the fixed-count protocol: exactly `runs` samples.
    fixed, _ = time_batches(jitter, None, warmup=0, runs=7, max_time_s=0)
    assert fixed["n"] == 7
    # Fewer than 6 samples give no 95% interval for the median: never on target.
    steady, _ = time_batches(lambda _x: None, None, warmup=0, runs=3, max_time_s=0)
    assert steady["n"] == 3 and steady["noisy"] is True


def _stat(median: float, lo: float, hi: float, *, noisy: bool = False) -> dict:
    return {"median": median, "median_ci95": [lo, hi], "noisy": noisy}


def test_compare_latency_gives_a_ratio_only_for_separated_intervals():
    separated = compare_latency(_stat(2.0, 1.9, 2.1), _stat(1.0, 0.95, 1.05))
    assert separated == {"ratio": 2.0, "measurable": True, "noisy": False}
    # A CI as wide as the dashboard's [0.046, 21.049] ms against another wide one: no ratio.
    overlapping = compare_latency(
        _stat(27.6, 0.048, 30.2, noisy=True), _stat(0.05, 0.046, 21.049, noisy=True)
    )
    assert overlapping["ratio"] is None and overlapping["measurable"] is False
    assert overlapping["note"] == "no measurable difference" and overlapping["noisy"] is True
    # Noisy timings whose intervals still separate are compared, and say they were noisy.
    noisy = compare_latency(_stat(1.0, 0.9, 1.1, noisy=True), _stat(4.0, 3.0, 5.0))
    assert noisy["ratio"] == pytest.approx(0.25) and noisy["noisy"] is True


@pytest.mark.parametrize(
    "params", [MeasureParams, HardwareSimParams, BudgetGateParams, ParityParams]
)
@pytest.mark.parametrize(
    "bad",
    [
        {"ci_target": 0},
        {"ci_target": 0.9},
        {"max_time_s": -1},
        {"max_time_s": 0},
        {"max_time_s": 61},
    ],
)
def test_timing_params_reject_out_of_bounds_values(params, bad):
    with pytest.raises(ValidationError, match=next(iter(bad))):
        params(**bad)


def test_measure_passes_its_timing_params_and_records_threads(digits):
    model = DecisionTreeClassifier(max_depth=4, random_state=0).fit(digits.X_train, digits.y_train)
    params = MeasureParams(batch_sizes=[1], warmup=1, runs=3, ci_target=0.2, max_time_s=0.2)
    stat = measure_model(ModelArtifact("sklearn", model), digits, params)["latency_ms"]["b1"]
    assert stat.keys() >= TIMING_KEYS and stat["ci_target"] == 0.2 and stat["n"] >= 3
    assert isinstance(stat["threads"], int) and stat["threads"] >= 1


def test_a_worker_with_several_pool_processes_on_few_cores_says_so(monkeypatch):
    from modules.evaluation.measure import timing_environment

    monkeypatch.setenv("MCAAS_WORKER_CONCURRENCY", "4")
    monkeypatch.setenv("MCAAS_WORKER_CPUS", "2")
    env = timing_environment("sklearn")
    assert env["worker_concurrency"] == 4 and env["cpus"] == 2
    assert "4 worker pool processes" in env["warning"]
    assert "--concurrency=1" in env["warning"]

    monkeypatch.setenv("MCAAS_WORKER_CONCURRENCY", "1")
    assert "warning" not in timing_environment("sklearn")
    monkeypatch.delenv("MCAAS_WORKER_CONCURRENCY")
    outside = timing_environment("torch")
    assert outside["worker_concurrency"] is None and "warning" not in outside
    assert outside["threads"] >= 1


def test_measure_records_its_timing_environment(small_mlp, digits, monkeypatch):
    from modules.evaluation.measure import MeasureParams, measure_model

    monkeypatch.setenv("MCAAS_WORKER_CONCURRENCY", "3")
    monkeypatch.setenv("MCAAS_WORKER_CPUS", "1")
    metrics = measure_model(
        small_mlp, digits, MeasureParams(batch_sizes=[1], warmup=1, runs=20, max_time_s=0.1)
    )
    assert metrics["timing_environment"]["worker_concurrency"] == 3
    assert "warning" in metrics["timing_environment"]
