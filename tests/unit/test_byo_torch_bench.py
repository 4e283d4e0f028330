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
