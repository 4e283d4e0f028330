import pytest
from pydantic import ValidationError

from modules.errors import BadInputError
from modules.evaluation.hardware_sim import (
    MIB,
    HardwareProbe,
    HardwareSimParams,
    MemoryCurve,
    energy_estimate_mj,
    estimated_latency_ms,
    evaluate_budget,
    fit_memory_curve,
    fit_verdict,
    hardware_sim,
    pick_batch,
    scale_stat,
)
from modules.evaluation.stats import summarize


def test_energy_units_are_millijoules():
    # 2 W for 6 ms is 12 mJ (0.012 J); per sample of a batch of 4 it is 3 mJ.
    assert energy_estimate_mj(6.0, power_w=2.0) == pytest.approx(12.0)
    assert energy_estimate_mj(6.0, power_w=2.0, batch_size=4) == pytest.approx(3.0)
    # A 0.05 W microcontroller at 100 ms: 5 mJ.
    assert energy_estimate_mj(100.0, power_w=0.05) == pytest.approx(5.0)
    with pytest.raises(BadInputError, match="power_w"):
        energy_estimate_mj(1.0, power_w=0)


def test_estimated_latency_divides_by_compute_scale():
    assert estimated_latency_ms(3.0, compute_scale=0.5) == pytest.approx(6.0)
    assert estimated_latency_ms(3.0, compute_scale=2.0) == pytest.approx(1.5)
    for bad in (0.0, -1.0):
        with pytest.raises(BadInputError, match="compute_scale"):
            estimated_latency_ms(3.0, compute_scale=bad)


def test_scale_stat_scales_every_location_number_and_keeps_n():
    stat = summarize([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], unit="ms")
    half = scale_stat(stat, 0.5)
    for key in ("mean", "median", "std", "min", "max"):
        assert half[key] == pytest.approx(stat[key] / 2)
    assert half["ci95"] == pytest.approx([v / 2 for v in stat["ci95"]])
    assert half["median_ci95"] == pytest.approx([v / 2 for v in stat["median_ci95"]])
    assert half["n"] == 7


def test_memory_curve_fits_a_line_and_never_underestimates():
    curve = fit_memory_curve({1: 1100, 8: 1800, 64: 7400, 256: 26700}, model_bytes=1000)
    assert curve.per_sample_bytes == pytest.approx(100, rel=0.02)
    for batch, measured in curve.measured.items():
        assert curve.predict(batch) >= measured - 1e-6


def test_auto_batch_picks_a_smaller_batch_under_a_smaller_budget():
    curve = MemoryCurve(intercept_bytes=1000, per_sample_bytes=100, margin_bytes=0, model_bytes=900)
    # M(b) = 1000 + 100 b: 1 MiB fits b <= 10475 -> 4096 (capped); 20 KB fits b <= 194 -> 128.
    assert pick_batch(curve, 1 * MIB) == 4096
    assert pick_batch(curve, 20_000) == 128
    assert pick_batch(curve, 1_150) == 1
    assert pick_batch(curve, 1_050) is None
    assert pick_batch(curve, 20_000, max_batch=64) == 64


def test_auto_batch_on_a_measured_model(small_mlp, digits):
    probe = HardwareProbe(small_mlp, digits, memory_batch_sizes=(1, 16, 64), runs=3, warmup=1)
    assert probe.curve.per_sample_bytes > 0
    b1 = probe.curve.predict(1)
    roomy = pick_batch(probe.curve, b1 + 200 * probe.curve.per_sample_bytes)
    tight = pick_batch(probe.curve, b1 + 10 * probe.curve.per_sample_bytes)
    assert tight is not None and roomy is not None and tight < roomy


def test_fit_verdict_states_the_numbers():
    fits, reasons = fit_verdict(
        model_bytes=3 * MIB, serialized_bytes=2 * MIB, memory_budget_mb=2, flash_mb=4
    )
    assert not fits
    assert "3.000 MB > memory budget 2.000 MB (does not fit)" in reasons[0]
    assert "2.000 MB <= flash 4.000 MB" in reasons[1]
    fits, _ = fit_verdict(model_bytes=1, serialized_bytes=5 * MIB, memory_budget_mb=2, flash_mb=4)
    assert not fits  # the file alone is over the flash


def test_evaluate_budget_labels_estimates(small_mlp, digits):
    probe = HardwareProbe(small_mlp, digits, memory_batch_sizes=(1, 8), runs=3, warmup=1)
    result = evaluate_budget(probe, memory_budget_mb=8, compute_scale=0.5, power_w=2.0)
    measured = result["measured_latency_ms"]["b1"]["median"]
    assert result["estimated_latency_ms"]["b1"]["median"] == pytest.approx(measured / 0.5)
    energy = result["energy_mj_per_inference_estimate"]["b1"]
    assert energy["median"] == pytest.approx(2.0 * measured / 0.5)
    assert energy["unit"] == "mJ" and "estimate" in result["energy_estimate_note"]
    assert result["fits"] and result["auto_batch"] >= 1
    for bad in ({"memory_budget_mb": 0}, {"compute_scale": -1}):
        kw = {"memory_budget_mb": 8, "compute_scale": 1.0, "power_w": 1.0, **bad}
        with pytest.raises(BadInputError, match=next(iter(bad))):
            evaluate_budget(probe, **kw)


def test_hardware_sim_step_uses_the_profile(small_mlp, digits, ctx_factory):
    ctx = ctx_factory(profile={"memory_budget_mb": 0.01, "compute_scale": 0.25, "power_w": 1})
    out = hardware_sim(small_mlp, digits, HardwareSimParams(runs=3, warmup=1), ctx)
    m = out.metrics
    assert out.model is None and out.verdict is None
    # The 64-32-10 MLP's weights are ~10 KB (> 0.01 MB = 10.5 KB with activations).
    assert m["memory_budget_bytes"] == int(0.01 * MIB)
    assert m["compute_scale"] == 0.25 and m["profile"] == "custom"
    assert any("MB" in r for r in m["fit_reasons"])
    assert all("estimate" in k for k in m if k.startswith("energy"))


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"memory_budget_mb": 0}, "memory_budget_mb"),
        ({"memory_budget_mb": -4}, "memory_budget_mb"),
        ({"compute_scale": 0}, "compute_scale"),
        ({"memory_batch_sizes": [0, 8]}, "memory_batch_sizes"),
    ],
)
def test_bad_budget_params_name_the_field(params, needle):
    with pytest.raises(ValidationError, match=needle):
        HardwareSimParams(**params)
