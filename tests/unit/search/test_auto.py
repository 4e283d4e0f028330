import pytest
from pydantic import ValidationError

from modules.evaluation.measure import count_params
from modules.search.auto import AutoParams, accuracy_floor, auto, trial_plan

FAST = {"runs": 3, "warmup": 1}
ROOMY = {"memory_budget_mb": 64, "compute_scale": 1, "power_w": 1}


def space(step, values, **extra):
    return {"step": step, "grid": {"amount": values}, **extra}


def test_accuracy_floor_absolute_and_relative():
    assert accuracy_floor(0.96, max_drop=1.0, drop_kind="absolute") == pytest.approx(0.95)
    assert accuracy_floor(0.90, max_drop=10.0, drop_kind="relative") == pytest.approx(0.81)


def test_best_candidate_within_budget_is_returned(small_mlp, digits, ctx_factory, slim_step):
    params = AutoParams(search=[space(slim_step, [0.2, 0.5, 0.9])], max_drop=100, **FAST)
    out = auto(small_mlp, digits, params, ctx_factory(profile=ROOMY))
    m = out.metrics
    assert m["met_budget"] and m["n_trials"] == 3 and m["stopped_by"] == "exhausted"
    # With no accuracy limit the smallest candidate wins; the search tried all three.
    assert m["best"] == "t_slim(amount=0.9)"
    assert count_params(out.model)[0] < 0.2 * count_params(small_mlp)[0]
    assert m["size_bytes"] == min(r["size_bytes"] for r in m["rows"])
    assert "meets the budget" in m["reason"]
    assert out.files["auto_trials.csv"].count(b"\n") == 5  # header + input + 3 trials


def test_accuracy_drop_limits_the_choice(small_mlp, digits, ctx_factory, slim_step):
    params = AutoParams(search=[space(slim_step, [0.0, 0.95])], max_drop=0.5, **FAST)
    m = auto(small_mlp, digits, params, ctx_factory(profile=ROOMY)).metrics
    rows = {r["label"]: r for r in m["rows"]}
    # Two neurons left of 32: far below the floor, so not chosen although smallest.
    assert rows["t_slim(amount=0.95)"]["violations"][0].startswith("accuracy")
    assert m["best"] != "t_slim(amount=0.95)" and m["met_budget"]
    assert m["accuracy_floor"] == pytest.approx(m["baseline_accuracy"] - 0.005)


def test_impossible_budget_returns_best_so_far_with_reason(
    small_mlp, digits, ctx_factory, zero_step
):
    impossible = {"memory_budget_mb": 1e-6, "compute_scale": 1, "power_w": 1}
    params = AutoParams(search=[space(zero_step, [0.3, 0.6])], max_drop=1, **FAST)
    out = auto(small_mlp, digits, params, ctx_factory(profile=impossible))
    m = out.metrics
    assert not m["met_budget"]
    assert m["reason"].startswith("no candidate met the budget of profile custom")
    assert "best-so-far" in m["reason"] and "> budget 1e-06 MB" in m["reason"]
    assert m["best"] in {r["label"] for r in m["rows"]}
    assert m["best_row"]["violations"]


def test_max_trials_and_max_time_bound_the_search(small_mlp, digits, ctx_factory, zero_step):
    many = [space(zero_step, [0.1, 0.2, 0.3, 0.4, 0.5])]
    m = auto(
        small_mlp, digits, AutoParams(search=many, max_trials=2, **FAST), ctx_factory(profile=ROOMY)
    ).metrics
    assert m["n_trials"] == 2 and m["stopped_by"] == "max_trials"
    out = auto(
        small_mlp,
        digits,
        AutoParams(search=many, max_time_s=1e-9, **FAST),
        ctx_factory(profile=ROOMY),
    )
    assert out.metrics["n_trials"] == 0 and out.metrics["stopped_by"] == "max_time"
    assert out.metrics["best"] == "input" and out.model is None  # never ends with nothing


def test_trial_plan_interleaves_spaces():
    from modules.search.auto import SearchSpace

    class Fake(SearchSpace):
        @classmethod
        def of(cls, step, values):
            return cls.model_construct(step=step, grid={"p": values}, base_params={}, then=[])

    a, b = Fake.of("a", [1, 2, 3]), Fake.of("b", [10])
    plan = trial_plan([a, b], 3)
    assert [(p[1].step, p[2]["p"]) for p in plan] == [("a", 1), ("b", 10), ("a", 2)]


def test_failed_candidates_are_rows_not_crashes(small_mlp, digits, ctx_factory, zero_step):
    # onnx_quantize takes ONNX models, so this chain fails on the torch candidate.
    params = AutoParams(
        search=[space(zero_step, [0.2], then=[{"name": "onnx_quantize", "params": {}}])], **FAST
    )
    m = auto(small_mlp, digits, params, ctx_factory(profile=ROOMY)).metrics
    failed = m["rows"][1]
    assert "accepts ['onnx'] models, got 'torch'" in failed["error"]
    assert failed["violations"][0].startswith("failed:")
    assert m["best"] == "input" and m["met_budget"]


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"search": [{"step": "t_zero", "grid": {"amout": [0.1]}}]}, "unknown sweep param 'amout'"),
        ({"search": [{"step": "t_zero", "grid": {"amount": [3]}}]}, "amount=3"),
        ({"search": [{"step": "t_zero", "grid": {}}]}, "empty grid"),
        ({"max_drop": -1}, "max_drop"),
        ({"max_trials": 0}, "max_trials"),
        ({"max_time_s": 0}, "max_time_s"),
    ],
)
def test_bad_params_are_named(params, needle, zero_step):
    with pytest.raises(ValidationError, match=needle):
        AutoParams(**params)


def test_a_model_that_does_not_fit_the_data_is_a_clear_error(tmp_path):
    from modules.core.jobspec import parse_job_spec
    from modules.errors import IncompatibleError
    from modules.pipeline.local import LocalWorkspace
    from modules.pipeline.run import run_step

    ws = LocalWorkspace(tmp_path)
    train = parse_job_spec(
        {"job_id": "b", "steps": [{"name": "train", "params": {"model": "logreg"}}]}
    )
    key = run_step(train, 0, store=ws.store, log=ws.log).output_key  # 64 digits features
    job = parse_job_spec(
        {"job_id": "a", "model": key, "dataset": "iris", "steps": [{"name": "auto"}]}
    )
    with pytest.raises(
        IncompatibleError, match="input model cannot be measured.*64 input features"
    ):
        run_step(job, 0, store=ws.store, log=ws.log)


def _row(label, *, latency, ci, accuracy=0.95, size=1000, violations=()):
    return {
        "label": label,
        "estimated_latency_ms": latency,
        "energy_mj_estimate": latency,
        "latency_ci95": list(ci),
        "accuracy": accuracy,
        "size_bytes": size,
        "violations": list(violations),
    }


def test_overlapping_latency_cis_are_a_tie_settled_by_accuracy():
    from modules.search.auto import beats

    best = _row("best", latency=1.0, ci=(0.8, 1.2), accuracy=0.96)
    # Looks 2x faster, but its CI overlaps: not measurably faster, and less accurate.
    noisy = _row("noisy", latency=0.5, ci=(0.1, 0.9), accuracy=0.95)
    assert not beats(noisy, best, "latency")
    assert not beats(noisy, best, "energy")
    assert beats(noisy, best, "size") is False  # same size: the rank key's tie-break
    # Measurably faster (CIs apart) wins on latency even when a little less accurate.
    fast = _row("fast", latency=0.5, ci=(0.45, 0.55), accuracy=0.95)
    assert beats(fast, best, "latency")
    # Tied on latency and as accurate: the smaller one wins.
    smaller = _row("smaller", latency=1.1, ci=(0.9, 1.3), accuracy=0.96, size=500)
    assert beats(smaller, best, "latency")


def test_sweep_rows_carry_the_noisy_flag(small_mlp, digits, ctx_factory, monkeypatch):
    from modules.evaluation.measure import MeasureParams
    from modules.search import sweep

    real = sweep.measure_model

    def one_noisy(artifact, data, params):
        metrics = real(artifact, data, params)
        metrics["latency_ms"]["b1"]["noisy"] = True
        metrics["latency_ms"]["b8"]["noisy"] = False
        return metrics

    monkeypatch.setattr(sweep, "measure_model", one_noisy)
    row = sweep.candidate_row(
        small_mlp,
        digits,
        profile=ctx_factory().profile,
        measure=MeasureParams(batch_sizes=[1, 8], warmup=1, runs=20, max_time_s=0.2),
    )
    assert row["latency_noisy"] is True
    assert row["latency_b8_noisy"] is False
    assert "latency_noisy" in sweep.ROW_COLUMNS


def test_the_default_torch_search_tries_int8_in_its_first_round(small_mlp):
    from modules.search.auto import default_search

    spaces = default_search(small_mlp)
    assert "quantize_dynamic" in [s.step for s in spaces]
    first_round = [space.step for _, space, _ in trial_plan(spaces, len(spaces))]
    assert "quantize_dynamic" in first_round
