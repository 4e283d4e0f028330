"""benchmarks/byo_torch.py: same-run ratios, the target verdicts, failed rows, a --quick run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from benchmarks import byo_torch as bench
from benchmarks.byo_torch import CHAIN, FP32, FP32_ORT, INT8, KD, STRUCT, Row


def lat(median: float) -> dict[int, dict[str, Any]]:
    stat = {"median": median, "median_ci95": [median * 0.9, median * 1.1]}
    return {1: stat, 32: {**stat, "median": median * 10}}


def result(*overrides: Row) -> dict[str, Any]:
    rows = {
        FP32: Row(
            FP32,
            [],
            "COMPLETED",
            framework="torch",
            accuracy=0.98,
            size_bytes=40_000,
            key="k0",
            latency=lat(2.0),
        ),
        FP32_ORT: Row(
            FP32_ORT,
            [],
            "COMPLETED",
            framework="onnx",
            accuracy=0.98,
            size_bytes=39_000,
            key="k1",
            latency=lat(1.0),
        ),
        STRUCT: Row(
            STRUCT,
            [],
            "COMPLETED",
            framework="torch",
            accuracy=0.975,
            size_bytes=10_000,
            key="k2",
            latency=lat(1.0),
        ),
        INT8: Row(
            INT8,
            [],
            "COMPLETED",
            framework="onnx",
            accuracy=0.98,
            size_bytes=10_000,
            key="k3",
            latency=lat(0.5),
        ),
        KD: Row(
            KD,
            [],
            "COMPLETED",
            framework="torch",
            accuracy=0.96,
            size_bytes=3_000,
            key="k4",
            latency=lat(0.5),
        ),
        CHAIN: Row(
            CHAIN,
            [],
            "COMPLETED",
            framework="onnx",
            accuracy=0.97,
            size_bytes=2_500,
            key="k5",
            latency=lat(0.25),
        ),
    }
    rows.update({row.label: row for row in overrides})
    return {"model": "resnet18", "rows": list(rows.values())}


def test_ratios_are_taken_against_the_same_runtime() -> None:
    d = bench.derived(result())
    assert d[STRUCT]["ratio"] == pytest.approx(4.0)
    assert d[STRUCT]["b1"] == pytest.approx(2.0)  # against the fp32 torch upload (2.0 ms)
    assert d[INT8]["b32"] == pytest.approx(2.0)  # against fp32 ONNX Runtime (10 ms at b32)
    assert d[CHAIN]["ratio"] == pytest.approx(16.0)
    assert d[CHAIN]["drop"] == pytest.approx(1.0)
    assert d[KD]["drop"] == pytest.approx(2.0)


def test_targets_report_each_check() -> None:
    lines = bench.target_lines(result())
    assert lines[0].startswith(f"- **{STRUCT}**: met")
    # int8 is 3.9x smaller than the fp32 ONNX file: the 3.8x bound holds against both sizes.
    assert lines[1].startswith(f"- **{INT8}**: met") and "3.90 >= 3.8" in lines[1]
    assert lines[2].startswith(f"- **{CHAIN}**: met")
    worse = result(
        Row(
            CHAIN,
            [],
            "COMPLETED",
            framework="onnx",
            accuracy=0.96,
            size_bytes=5_000,
            key="k5",
            latency=lat(0.25),
        )
    )
    chain = bench.target_lines(worse)[2]
    assert "MISSED" in chain
    assert "size ratio 8.00 >= 10.0 (missed)" in chain
    assert "accuracy drop pt 2.00 <= 1.5 (missed)" in chain


def test_a_failed_row_is_reported_not_hidden() -> None:
    failed = Row(INT8, [], "REJECTED", reason="step 0 (quantize_static) rejected: boom")
    res = result(failed)
    text = "\n".join(bench.table(res))
    assert f"| {INT8} | **REJECTED** | - |" in text
    assert "did not complete (REJECTED): step 0 (quantize_static) rejected: boom" in text
    assert "not measured (the row did not complete)" in bench.target_lines(res)[1]
    assert bench.target_lines(res)[1].startswith(f"- **{INT8}**: MISSED")


@pytest.mark.slow
def test_quick_run_writes_a_table(tmp_path: Path) -> None:
    out = tmp_path / "byo.md"
    assert bench.main(["--quick", "--models", "residual_mlp", "--out", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert "## Residual MLP on `digits`" in text
    for label in (FP32, FP32_ORT, STRUCT, INT8, KD, CHAIN):
        assert f"| {label} | ok |" in text
    assert "did not complete" not in text
    assert "Fine-tune recipes for structured 50%" in text and "mean over 2 seeds" in text


def job(seed: int, accuracy: float | None, status: str = "COMPLETED") -> bench.Job:
    return bench.Job(
        seed=seed,
        status=status,
        reason="" if status == "COMPLETED" else "boom",
        key=f"k{seed}" if status == "COMPLETED" else None,
        framework="torch",
        accuracy=accuracy,
        size_bytes=10_000,
        seconds=2.0 + seed,
        step_metrics=[{"seed": seed}],
    )


def test_a_seeded_row_reports_the_mean_drop_with_a_t_interval() -> None:
    row = Row(STRUCT, [{"name": "prune_structured"}], latency=lat(1.0))
    bench.fill_row(row, [job(0, 0.97), job(1, 0.98), job(2, 0.975)])
    assert row.seeds == [0, 1, 2] and row.key == "k0" and row.seed_keys == ["k0", "k1", "k2"]
    assert row.accuracy == pytest.approx(0.975) and row.seconds == pytest.approx(3.0)
    d = bench.derived(result(row))[STRUCT]
    assert d["drop"] == pytest.approx(0.5)  # 98.0 - 97.5
    # drops 1.0, 0.0, 0.5 pt: mean 0.5, sd 0.5, t(0.975, 2) = 4.303 -> half-width 1.242
    assert d["drop_lo"] == pytest.approx(0.5 - 1.242, abs=1e-3)
    assert d["drop_hi"] == pytest.approx(0.5 + 1.242, abs=1e-3)
    text = "\n".join(bench.table(result(row)))
    assert f"| {STRUCT} | ok | 3 |" in text and "+0.50 [-0.74, +1.74]" in text
    line = bench.target_lines(result(row))[0]
    assert "accuracy drop pt 0.50 <= 1.0 (ok)" in line and "mean over 3 seeds" in line


def test_one_failed_seed_fails_the_row() -> None:
    row = Row(STRUCT, [{"name": "prune_structured"}])
    bench.fill_row(row, [job(0, 0.97), job(1, None, status="FAILED")])
    assert (row.status, row.reason, row.key, row.accuracy) == ("FAILED", "boom", None, None)
    assert bench.target_lines(result(row))[0].startswith(f"- **{STRUCT}**: MISSED")


def test_recipes_table_lists_each_fine_tune_on_the_same_seeds() -> None:
    plain = Row("labels", [{"name": "prune_structured", "params": {"finetune_epochs": 5}}])
    bench.fill_row(plain, [job(0, 0.96), job(1, 0.97)])
    res = {**result(), "recipes": [plain], "finetune_epochs": 5, "seeds": [0, 1]}
    text = "\n".join(bench.recipes_table(res))
    assert "the same job seeds [0, 1]" in text
    assert "| labels | `{'finetune_epochs': 5}` | 96.50 | +1.50 [" in text
    assert "| 96.00, 97.00 |" in text
