"""Accuracy-aware int8 for ONNX graphs: what `onnx_quantize` runs with `search: true`.

The fp32 graph's outputs on the evaluation rows are the reference, and every trial is judged
by the parity gate's rules for the output kind (labels, embedding or regression; see
modules.deployment.parity_metrics), with the step's thresholds.

1. grid: dynamic and static (static only with calibration rows) x per-tensor and
   per-channel x reduce_range off and on x int8 and uint8 weights.
2. sensitivity, only when no grid setting passes: the base setting (the best-scoring of
   those within 25% of the fastest grid latency: leaving nodes in float recovers precision,
   never speed) quantizes one node at a time (one op type at a time when there are more
   than max_sensitivity_nodes candidate nodes), and each probe's parity score is measured.
   A probe quantizes almost nothing, so probes are diagnostics, never candidates.
3. exclude: the base again with the 1, 2, ... most damaging units left in float, in two
   orders (most damage first; most damage per byte saved first, which prefers the cheap
   culprits), each until the gate passes or max_excluded_nodes is reached. At least one
   node stays int8.

The smallest passing graph wins; among sizes within 1% the fastest, and among latencies
within 10% of the fastest the best parity score. When nothing passes, the best-scoring
graph so far is returned with a failed verdict whose reason has its numbers. Every trial,
probes included, is recorded with its settings, size, parity numbers, verdict and the
median latency at latency_batch rows.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from modules.core.step import Verdict
from modules.deployment.onnx_int8 import QuantSettings, prepare_graph, quantize_prepared
from modules.deployment.parity import time_feeds
from modules.deployment.parity_metrics import (
    GateThresholds,
    compare_outputs,
    output_verdict,
    parity_score,
    resolve_kind,
)
from modules.evaluation.inference import OrtRunner
from modules.evaluation.measure import DEFAULT_CI_TARGET

# Nodes that carry weights or do the heavy arithmetic: what a probe quantizes one at a time.
WEIGHTED_OPS = frozenset(
    {"MatMul", "Gemm", "Conv", "ConvTranspose", "Gather", "Attention", "EmbedLayerNormalization"}
)
# Sizes within 1% and latencies within 10% (timing noise on a shared CPU) count as equal.
SIZE_TIE = 0.01
LATENCY_TIE = 0.10
# The exclusions start from the best setting at most this much slower than the fastest.
BASE_SPEED_BAND = 0.25
# A probe this close to a perfect score shows a unit that does not hurt; it is never excluded.
DAMAGE_FLOOR = 1e-6
CALIBRATION_CACHE = "calibration_ranges.json"
_HEADLINE = ("agreement", "max_abs_prob_diff", "min_cosine", "mean_cosine", "r2", "max_rel_error")


@dataclass(frozen=True)
class SearchBudget:
    """How far the search may go."""

    max_excluded_nodes: int = 8
    max_sensitivity_nodes: int = 64
    max_trials: int = 100
    latency_batch: int = 32
    latency_runs: int = 5
    # Each trial is timed until its median CI is within latency_ci_target, as measure does;
    # the time cap is a quarter of measure's because the search times up to max_trials graphs.
    latency_ci_target: float = DEFAULT_CI_TARGET
    latency_max_time_s: float = 0.25
    threads: int | None = 1
    # Exclusions start from the best setting within this band of the fastest; None picks by
    # parity alone, which makes the search independent of timing (tests, noisy machines).
    speed_band: float | None = BASE_SPEED_BAND


def _time_once(
    run: Any, feeds: dict[str, np.ndarray], *, batch: int, budget: SearchBudget
) -> dict[str, Any]:
    """The latency summary of one graph at one batch size, timed under the budget's rule."""
    return time_feeds(
        run,
        feeds,
        sizes=[batch],
        warmup=1,
        runs=budget.latency_runs,
        threads=budget.threads,
        ci_target=budget.latency_ci_target,
        max_time_s=budget.latency_max_time_s,
    )[f"b{batch}"]


@dataclass
class SearchResult:
    """The chosen graph (None only when every trial failed to quantize) and every trial."""

    model: Any | None
    chosen: dict[str, Any] | None
    verdict: Verdict
    kind: str
    kind_reason: str
    fp32: dict[str, Any]
    trials: list[dict[str, Any]]
    pre_process: str
    stopped: str | None = None


def grid_settings(*, static: bool) -> list[QuantSettings]:
    """Every whole-graph setting the grid phase tries, dynamic first."""
    modes = ("dynamic", "static") if static else ("dynamic",)
    return [
        QuantSettings(mode=mode, weight_type=wt, per_channel=pc, reduce_range=rr)
        for mode in modes
        for pc in (False, True)
        for rr in (False, True)
        for wt in ("int8", "uint8")
    ]


def candidate_nodes(proto: Any, mode: str) -> list[tuple[str, str]]:
    """(name, op type) of the nodes the quantizer would turn int8 that a probe can target."""
    from onnxruntime.quantization.registry import IntegerOpsRegistry, QDQRegistry

    registry = IntegerOpsRegistry if mode == "dynamic" else QDQRegistry
    initializers = {t.name for t in proto.graph.initializer}
    out = []
    for node in proto.graph.node:
        # The dynamic quantizer handles a Gemm as the MatMul it rewrites it into.
        op_type = "MatMul" if mode == "dynamic" and node.op_type == "Gemm" else node.op_type
        if op_type not in WEIGHTED_OPS or op_type not in registry:
            continue
        # A Gather is quantized only when it reads a stored table (an embedding), and the
        # dynamic quantizer leaves a MatMul of two activations (attention scores) in float.
        if node.op_type == "Gather" and node.input[0] not in initializers:
            continue
        if mode == "dynamic" and not initializers.intersection(node.input):
            continue
        out.append((node.name, node.op_type))
    return out


def _message(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


@dataclass
class _Search:
    source: Path
    workdir: Path
    reference: dict[str, np.ndarray]
    feeds: dict[str, np.ndarray]
    calibration: list[dict[str, np.ndarray]] | None
    kind: str
    thresholds: GateThresholds
    budget: SearchBudget
    fp32_size: int
    trials: list[dict[str, Any]] = field(default_factory=list)
    kept: dict[int, Any] = field(default_factory=dict)
    stopped: str | None = None

    def run(
        self, phase: str, settings: QuantSettings, *, candidate: bool = True
    ) -> dict[str, Any] | None:
        """Quantize, compare and time one setting; None when the trial budget is spent."""
        if len(self.trials) >= self.budget.max_trials:
            self.stopped = f"max_trials ({self.budget.max_trials}) reached"
            return None
        record: dict[str, Any] = {
            "trial": len(self.trials),
            "phase": phase,
            "label": settings.label(),
            "settings": settings.as_dict(),
            "candidate": candidate,
        }
        self.trials.append(record)
        start = time.perf_counter()
        try:
            proto, details = quantize_prepared(
                self.source,
                settings,
                workdir=self.workdir,
                calibration=self.calibration,
                calibration_cache=self.workdir / CALIBRATION_CACHE,
            )
            runner = OrtRunner.of(proto, threads=self.budget.threads)
            result = compare_outputs(
                self.reference, runner.run(self.feeds), kind=self.kind, worst=3
            )
        except Exception as exc:  # a setting ORT cannot quantize or run is one failed trial
            record.update(error=_message(exc), passed=False, score=None)
            return record
        verdict = output_verdict(result, self.thresholds)
        batch = runner.fixed_batch or self.budget.latency_batch
        latency = _time_once(runner.run, self.feeds, batch=batch, budget=self.budget)
        size = proto.ByteSize()
        record.update(
            size_bytes=size,
            compression_ratio=self.fp32_size / size if size else None,
            parity={k: result[k] for k in (*_HEADLINE, "max_abs_error") if k in result},
            worst_output=result["worst_output"],
            worst_rows=result["worst_rows"],
            score=parity_score(result),
            passed=verdict.passed,
            reason=verdict.reason,
            latency_batch=batch,
            latency_ms=latency["median"],
            latency_ci95=latency["median_ci95"],
            latency_noisy=latency["noisy"],
            int8_nodes=details["int8_nodes"],
            seconds=time.perf_counter() - start,
        )
        if candidate:
            self._keep(record, proto)
        return record

    def _keep(self, record: dict[str, Any], proto: Any) -> None:
        # Only the graphs that can still be chosen stay in memory: the passing ones and the
        # best-scoring one.
        best = self.best_scoring()
        if record["passed"] or (best is not None and best["trial"] == record["trial"]):
            self.kept[record["trial"]] = proto
        self.kept = {
            i: p
            for i, p in self.kept.items()
            if self.trials[i]["passed"] or (best is not None and best["trial"] == i)
        }

    def candidates(self) -> list[dict[str, Any]]:
        return [t for t in self.trials if t["candidate"] and t.get("score") is not None]

    def best_scoring(self) -> dict[str, Any] | None:
        """Highest parity score; the smaller graph on ties."""
        pool = self.candidates()
        return max(pool, key=lambda t: (t["score"], -t["size_bytes"])) if pool else None

    def exclusion_base(self) -> dict[str, Any] | None:
        """The best-scoring setting among those within BASE_SPEED_BAND of the fastest.

        Leaving nodes in float recovers precision but never speed, so the setting the
        exclusions start from comes from the fast ones (uint8 weights are much slower than
        int8 on CPUs with VNNI, for example).
        """
        pool = self.candidates()
        if not pool:
            return None
        band = self.budget.speed_band
        if band is not None:
            fastest = min(t["latency_ms"] for t in pool)
            pool = [t for t in pool if t["latency_ms"] <= fastest * (1 + band)]
        return max(pool, key=lambda t: (t["score"], -t["size_bytes"]))

    def smallest_passing(self) -> dict[str, Any] | None:
        """The smallest passing graph; near-equal sizes: the fastest; near speeds: the best."""
        passing = [t for t in self.candidates() if t["passed"]]
        if not passing:
            return None
        floor = min(t["size_bytes"] for t in passing)
        near = [t for t in passing if t["size_bytes"] <= floor * (1 + SIZE_TIE)]
        fastest = min(t["latency_ms"] for t in near)
        quick = [t for t in near if t["latency_ms"] <= fastest * (1 + LATENCY_TIE)]
        return max(quick, key=lambda t: (t["score"], -t["size_bytes"]))


def _sensitivity_units(
    nodes: list[tuple[str, str]], budget: SearchBudget
) -> tuple[str, list[tuple[str, tuple[str, ...]]]]:
    """(granularity, [(unit name, node names)]): one unit per node, or per op type."""
    if len(nodes) <= budget.max_sensitivity_nodes:
        return "node", [(name, (name,)) for name, _ in nodes]
    by_type: dict[str, list[str]] = {}
    for name, op_type in nodes:
        by_type.setdefault(op_type, []).append(name)
    return "op_type", [(op, tuple(names)) for op, names in by_type.items()]


@dataclass(frozen=True)
class _Probe:
    unit: str
    names: tuple[str, ...]
    damage: float  # how far below a perfect score the graph is with only this unit quantized
    saved: int  # bytes this unit's quantization saves: what leaving it in float costs


def exclusion_orders(probes: list[_Probe]) -> dict[str, list[_Probe]]:
    """Two orders to exclude units in: most damage first, and most damage per byte first.

    The first finds a single culprit whatever its size; the second prefers the cheap
    culprits (activation-only MatMuls, small projections) and so keeps the graph small.
    """
    hurting = [p for p in probes if p.damage > DAMAGE_FLOOR]
    return {
        "damage": sorted(hurting, key=lambda p: -p.damage),
        "damage_per_byte": sorted(hurting, key=lambda p: -p.damage / max(p.saved, 1024)),
    }


def _exclusion_phase(search: _Search, base: dict[str, Any], prepared: Any) -> None:
    settings = QuantSettings(**{k: v for k, v in base["settings"].items() if "nodes" not in k})
    nodes = candidate_nodes(prepared, settings.mode)
    if len(nodes) < 2 or search.budget.max_excluded_nodes == 0:
        return
    granularity, units = _sensitivity_units(nodes, search.budget)
    probes = []
    for unit, names in units:
        record = search.run(
            "sensitivity", replace(settings, nodes_to_quantize=names), candidate=False
        )
        if record is None:
            return
        record["unit"], record["granularity"] = unit, granularity
        if record.get("score") is not None:
            damage = max(0.0, 1.0 - record["score"])
            saved = max(0, search.fp32_size - record["size_bytes"])
            probes.append(_Probe(unit, names, damage, saved))
    cap = min(search.budget.max_excluded_nodes, len(nodes) - 1)
    tried: set[tuple[str, ...]] = set()
    for order_name, order in exclusion_orders(probes).items():
        excluded: list[str] = []
        for probe in order:
            if len(excluded) + len(probe.names) > cap:
                break
            excluded.extend(probe.names)
            key = tuple(sorted(excluded))
            if key in tried:
                continue
            tried.add(key)
            record = search.run("exclude", replace(settings, nodes_to_exclude=tuple(excluded)))
            if record is None:
                return
            record["order"] = order_name
            if record.get("passed"):
                break


def _verdict(search: _Search, chosen: dict[str, Any], *, passed: bool) -> Verdict:
    numbers = chosen["reason"].split(": ", 1)[-1]
    ratio = chosen["compression_ratio"]
    size = f"{search.fp32_size:,} -> {chosen['size_bytes']:,} bytes ({ratio:.2f}x smaller)"
    tried = f"{len(search.trials)} trials"
    if passed:
        return Verdict(True, f"int8 search chose {chosen['label']}: {numbers}; {size}; {tried}")
    why = f"; {search.stopped}" if search.stopped else ""
    return Verdict(
        False,
        f"int8 search: no setting passed the {search.kind} parity gate in {tried}{why}; best so "
        f"far, returned as the step's model: {chosen['label']}: {numbers}; {size}",
    )


def search_int8(
    proto: Any,
    *,
    feeds: dict[str, np.ndarray],
    calibration: list[dict[str, np.ndarray]] | None,
    thresholds: GateThresholds,
    meta: Mapping[str, Any],
    workdir: Path,
    budget: SearchBudget,
) -> SearchResult:
    """Find the smallest int8 graph that passes the parity thresholds; see the module doc."""
    import onnx

    fp32 = OrtRunner.of(proto, threads=budget.threads)
    reference = fp32.run(feeds)
    kind, why = resolve_kind(thresholds.output_kind, meta, reference)
    batch = fp32.fixed_batch or budget.latency_batch
    fp32_latency = _time_once(fp32.run, feeds, batch=batch, budget=budget)
    fp32_info = {
        "size_bytes": proto.ByteSize(),
        "latency_batch": batch,
        "latency_ms": fp32_latency["median"],
        "latency_ci95": fp32_latency["median_ci95"],
        "latency_noisy": fp32_latency["noisy"],
    }
    source, pre_process = prepare_graph(proto, workdir)
    # Activation ranges are cached per graph and calibration data: never reuse older ones.
    (workdir / CALIBRATION_CACHE).unlink(missing_ok=True)
    search = _Search(
        source=source,
        workdir=workdir,
        reference=reference,
        feeds=feeds,
        calibration=calibration or None,
        kind=kind,
        thresholds=thresholds,
        budget=budget,
        fp32_size=proto.ByteSize(),
    )
    for settings in grid_settings(static=bool(calibration)):
        if search.run("grid", settings) is None:
            break
    if search.smallest_passing() is None and search.stopped is None:
        base = search.exclusion_base()
        if base is not None:
            _exclusion_phase(search, base, onnx.load(str(source)))
    chosen = search.smallest_passing()
    passed = chosen is not None
    chosen = chosen or search.best_scoring()
    common: dict[str, Any] = {
        "kind": kind,
        "kind_reason": why,
        "fp32": fp32_info,
        "trials": search.trials,
        "pre_process": pre_process,
        "stopped": search.stopped,
    }
    if chosen is None:
        errors = sorted({t["error"] for t in search.trials if t.get("error")})
        reason = (
            f"int8 search: none of {len(search.trials)} settings could be quantized: {errors[:3]}"
        )
        return SearchResult(model=None, chosen=None, verdict=Verdict(False, reason), **common)
    chosen["chosen"] = True
    return SearchResult(
        model=search.kept[chosen["trial"]],
        chosen=chosen,
        verdict=_verdict(search, chosen, passed=passed),
        **common,
    )
