"""Accuracy-aware int8 for ONNX graphs: what `onnx_quantize` runs with `search: true`.

The fp32 graph's outputs on the evaluation rows are the reference, computed once and reused
by every trial; each trial is judged by the parity gate's rules for the output kind (labels,
embedding or regression; see modules.deployment.parity_metrics) with the step's thresholds,
at every one of the deploy batch sizes (rows per ONNX Runtime call; the worst one decides,
as in the gate). The step scores on rows it does not calibrate on.

1. grid (`grid_settings`): dynamic x per-tensor and per-channel x reduce_range off and on x
   int8 and uint8 weights; with calibration rows also static: uint8 activations with int8
   weights (U8S8, ORT's fast x86 layout) in QOperator format, per-tensor and per-channel,
   reduce_range off and on, the same in QDQ format once (per-channel), and U8U8 and S8S8
   once each; on transformer-like graphs (a MatMul or Gemm reading a LayerNormalization)
   also SmoothQuant (alpha 0.5) before static U8S8 and before dynamic int8. The most
   promising settings come first, so a max_trials that cuts the grid short cuts the
   least likely ones. A setting that differs from a passing one only in weight or
   activation type or reduce_range stores the same bytes (those change zero-point types,
   not sizes), so it cannot be smaller; they exist to recover precision, and the U8S8 /
   int8 member tried first is the fast x86 layout, so it is skipped (listed in `skipped`
   with the trial it defers to, never run).
2. sensitivity, only when no grid setting passes: one pass ranks the nodes. The base
   setting (the best-scoring of those within 25% of the fastest grid latency: leaving
   nodes in float recovers precision, never speed) is quantized once more with every
   candidate node's input and output exposed (in QDQ format and uncompacted, so the int8
   graph's float tensors keep the fp32 graph's names; a QOperator graph holds the same
   int8 weights and activation ranges in other ops); both graphs run once on the evaluation rows,
   and a node's damage is how much it raises the relative error of its tensor:
   err(output) - err(input), with err = ||int8 - fp32|| / ||fp32||. Units are single
   nodes, or op types when there are more than max_sensitivity_nodes candidate nodes.
3. exclude: the base with the k most damaging units left in float, k found by galloping
   and bisection: k = 1, 2, 4, ... up to the cap (max_excluded_nodes nodes; at least one
   node stays int8) until one passes, then halving the gap between the largest failing and
   the smallest passing k. Leaving fewer nodes in
   float makes a smaller graph, so once the gap is closed no untried k can beat the best
   passing graph and the search stops. This assumes that leaving more of the most damaging
   nodes in float never hurts parity, which the ranking makes the usual case.

The smallest passing graph wins; among sizes within 1% the fastest, and among latencies
within 10% of the fastest the best parity score. When nothing passes, the best-scoring
graph so far is returned with a failed verdict whose reason has its numbers. Every trial,
the sensitivity pass included, is recorded with its settings, size, parity numbers (per
batch size), verdict and the median latency at latency_batch rows. The search stops, and
says why (`stop_reason`), when its plan is done (`trials_exhausted`), when no untried trial
can beat the best passing one (`cannot_beat_best`), when even the most exclusions allowed
fail (`exclusion_cap`), or at max_trials (`max_trials`) or max_seconds (`time_budget`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from modules.core.step import Verdict
from modules.deployment.onnx_int8 import QuantSettings, prepare_graph, quantize_prepared
from modules.deployment.parity import compare_at_batches, time_feeds
from modules.deployment.parity_metrics import (
    GateThresholds,
    parity_score,
    resolve_kind,
    thresholds_of,
)
from modules.evaluation.inference import OrtRunner
from modules.evaluation.measure import DEFAULT_CI_TARGET

# Nodes that carry weights or do the heavy arithmetic: what the sensitivity pass ranks.
WEIGHTED_OPS = frozenset(
    {"MatMul", "Gemm", "Conv", "ConvTranspose", "Gather", "Attention", "EmbedLayerNormalization"}
)
# Sizes within 1% and latencies within 10% (timing noise on a shared CPU) count as equal.
SIZE_TIE = 0.01
LATENCY_TIE = 0.10
# The exclusions start from the best setting at most this much slower than the fastest.
BASE_SPEED_BAND = 0.25
# SmoothQuant's migration strength in the grid: the paper's default for most transformers.
SMOOTH_ALPHA = 0.5
# A unit that raises its tensor's relative error by less than this does not hurt; it is
# never excluded.
DAMAGE_FLOOR = 1e-6
CALIBRATION_CACHE = "calibration_ranges.json"
_HEADLINE = ("agreement", "max_abs_prob_diff", "min_cosine", "mean_cosine", "r2", "max_rel_error")
STOP_REASONS = (
    "trials_exhausted",
    "cannot_beat_best",
    "exclusion_cap",
    "max_trials",
    "time_budget",
)
Progress = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class SearchBudget:
    """How far the search may go."""

    max_excluded_nodes: int = 8
    max_sensitivity_nodes: int = 64
    max_trials: int = 100
    # Wall-clock budget of the trials (seconds); None = no limit.
    max_seconds: float | None = None
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
    batch_sizes: list[int]
    stop_reason: str
    stopped: str
    # Grid settings not run because a passing setting of the same bytes already exists.
    skipped: list[dict[str, Any]] = field(default_factory=list)


def grid_settings(*, static: bool, transformer_like: bool = False) -> list[QuantSettings]:
    """Every whole-graph setting the grid phase tries, the most promising first.

    static: calibration rows exist (static and SmoothQuant settings need them).
    transformer_like: a LayerNorm feeds a MatMul/Gemm, where SmoothQuant can help.
    """
    dynamic = [
        QuantSettings(mode="dynamic", weight_type=wt, per_channel=pc, reduce_range=rr)
        for wt in ("int8", "uint8")
        for rr in (False, True)
        for pc in (False, True)
    ]
    if not static:
        return dynamic
    u8s8 = QuantSettings(mode="static", weight_type="int8", activation_type="uint8")
    fast = [replace(u8s8, per_channel=pc) for pc in (False, True)]
    smooth = (
        [
            replace(u8s8, per_channel=True, smooth_alpha=SMOOTH_ALPHA),
            QuantSettings(mode="dynamic", per_channel=True, smooth_alpha=SMOOTH_ALPHA),
        ]
        if transformer_like
        else []
    )
    rest = [
        replace(u8s8, per_channel=True, quant_format="qdq"),
        *(replace(u8s8, per_channel=pc, reduce_range=True) for pc in (False, True)),
        replace(u8s8, per_channel=True, weight_type="uint8"),
        replace(u8s8, per_channel=True, activation_type="int8"),
    ]
    # Whole-graph int8 first (static U8S8, dynamic int8), then the smoothing, then the rest.
    return [*fast, *dynamic[:2], *smooth, *rest, *dynamic[2:]]


def size_class(settings: QuantSettings) -> tuple[Any, ...]:
    """What decides a setting's bytes: mode, format, scale granularity, smoothing."""
    quant_format = settings.quant_format if settings.mode == "static" else None
    return (settings.mode, quant_format, settings.per_channel, settings.smooth_alpha)


def transformer_like(proto: Any) -> bool:
    """True when a LayerNormalization feeds a MatMul/Gemm that SmoothQuant can rescale."""
    from modules.deployment.onnx_smooth import smoothable_groups

    producers = {o: n.op_type for n in proto.graph.node for o in n.output}
    return any(producers.get(act) == "LayerNormalization" for act in smoothable_groups(proto))


def candidate_nodes(proto: Any, mode: str) -> list[tuple[str, str]]:
    """(name, op type) of the nodes the quantizer would turn int8 that a search can target.

    Static nodes are those of the QDQ registry, the format the sensitivity pass runs in.
    """
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


class _Stop(Exception):
    """The trial budget (count or time) is spent; `search.stop_reason` says which."""


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
    batch_sizes: list[int]
    progress: Progress | None = None
    started: float = field(default_factory=time.perf_counter)
    trials: list[dict[str, Any]] = field(default_factory=list)
    kept: dict[int, Any] = field(default_factory=dict)
    stop_reason: str = "trials_exhausted"
    stopped: str = "every planned trial ran"

    def stop(self, reason: str, text: str) -> None:
        self.stop_reason, self.stopped = reason, text

    def begin(self, phase: str, settings: QuantSettings, *, candidate: bool) -> dict[str, Any]:
        """A new trial record; raises _Stop when the budget allows no more trials."""
        if len(self.trials) >= self.budget.max_trials:
            self.stop("max_trials", f"max_trials ({self.budget.max_trials}) reached")
            raise _Stop
        limit = self.budget.max_seconds
        if limit is not None and time.perf_counter() - self.started >= limit:
            self.stop("time_budget", f"time budget ({limit:g} s) spent")
            raise _Stop
        record: dict[str, Any] = {
            "trial": len(self.trials),
            "phase": phase,
            "label": settings.label(),
            "settings": settings.as_dict(),
            "candidate": candidate,
        }
        self.trials.append(record)
        return record

    def quantize(
        self, settings: QuantSettings, *, compact: bool = True
    ) -> tuple[Any, dict[str, Any]]:
        return quantize_prepared(
            self.source,
            settings,
            workdir=self.workdir,
            calibration=self.calibration,
            calibration_cache=self.workdir / CALIBRATION_CACHE,
            compact=compact,
        )

    def run(self, phase: str, settings: QuantSettings) -> dict[str, Any]:
        """Quantize, compare (at every batch size) and time one setting; a candidate trial."""
        record = self.begin(phase, settings, candidate=True)
        start = time.perf_counter()
        try:
            proto, details = self.quantize(settings)
            runner = OrtRunner.of(proto, threads=self.budget.threads)
            result, verdict = compare_at_batches(
                self.reference,
                lambda size: runner.run(self.feeds, chunk=size),
                sizes=self.batch_sizes,
                kind=self.kind,
                thresholds=self.thresholds,
                worst=3,
            )
        except Exception as exc:  # a setting ORT cannot quantize or run is one failed trial
            record.update(error=_message(exc), passed=False, score=None)
            self.report(record)
            return record
        batch = runner.fixed_batch or self.budget.latency_batch
        latency = _time_once(runner.run, self.feeds, batch=batch, budget=self.budget)
        size = proto.ByteSize()
        record.update(
            size_bytes=size,
            compression_ratio=self.fp32_size / size if size else None,
            parity={k: result[k] for k in (*_HEADLINE, "max_abs_error") if k in result},
            batch_size=result["batch_size"],
            by_batch_size={
                key: {k: v for k, v in row.items() if k in (*_HEADLINE, "passed", "reason")}
                for key, row in result["by_batch_size"].items()
            },
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
        self._keep(record, proto)
        self.report(record)
        return record

    def report(self, record: dict[str, Any]) -> None:
        """Hand one finished trial to the progress callback."""
        if self.progress is None:
            return
        best = self.smallest_passing()
        done = record["trial"] + 1
        passed = record.get("passed")
        verdict = "ranked" if passed is None else ("passed" if passed else "failed")
        text = f"int8 search: trial {done} (at most {self.budget.max_trials}), {record['phase']} "
        text += verdict
        if best is not None:
            text += f"; best passing {best['size_bytes']:,} bytes"
        self.progress(
            {
                "text": text,
                "trial": done,
                "max_trials": self.budget.max_trials,
                "phase": record["phase"],
                "label": record["label"],
                "passed": record.get("passed"),
                "score": record.get("score"),
                "best_passing_size_bytes": best["size_bytes"] if best else None,
                "elapsed_s": time.perf_counter() - self.started,
            }
        )

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


def _relative_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    ref = np.asarray(reference, dtype=np.float64)
    diff = np.linalg.norm(np.asarray(candidate, dtype=np.float64) - ref)
    return float(diff / max(float(np.linalg.norm(ref)), 1e-12))


def _with_outputs(proto: Any, names: list[str]) -> Any:
    """A copy of the graph that also outputs the named tensors (type left to ORT)."""
    import onnx
    from onnx import helper

    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    present = {o.name for o in copy.graph.output}
    for name in names:
        if name not in present:
            copy.graph.output.append(helper.make_empty_tensor_value_info(name))
            present.add(name)
    return copy


def tensor_errors(
    fp32: Any, int8: Any, feeds: Mapping[str, np.ndarray], names: list[str], threads: int | None
) -> dict[str, float]:
    """Relative error of each named float tensor of the int8 graph against the fp32 graph.

    One run of each graph with the tensors exposed; a name the int8 graph no longer has
    (the quantizer renamed it) is left out.
    """
    int8_tensors = {o for n in int8.graph.node for o in n.output}
    wanted = [n for n in names if n in int8_tensors]
    ref = OrtRunner.of(_with_outputs(fp32, wanted), threads=threads).run(feeds)
    out = OrtRunner.of(_with_outputs(int8, wanted), threads=threads).run(feeds)
    return {
        n: _relative_error(ref[n], out[n])
        for n in wanted
        if n in ref and n in out and np.asarray(ref[n]).dtype.kind == "f"
    }


@dataclass(frozen=True)
class _Unit:
    unit: str
    names: tuple[str, ...]
    damage: float | None  # None: the pass could not see this unit's tensors


def rank_units(
    prepared: Any, errors: Mapping[str, float], units: list[tuple[str, tuple[str, ...]]]
) -> list[_Unit]:
    """Units by damage, most first; the unmeasured ones last, in graph order.

    A node's damage is err(its output) - err(its first activation input): the error it
    adds, not the error it inherits from the nodes before it.
    """
    initializers = {t.name for t in prepared.graph.initializer}
    by_name = {n.name: n for n in prepared.graph.node}
    ranked = []
    for unit, names in units:
        damages = []
        for name in names:
            node = by_name[name]
            if node.output[0] not in errors:
                continue
            source = next((i for i in node.input if i and i not in initializers), None)
            damages.append(errors[node.output[0]] - errors.get(source or "", 0.0))
        ranked.append(_Unit(unit, names, max(0.0, sum(damages)) if damages else None))
    measured = sorted((u for u in ranked if u.damage is not None), key=lambda u: -(u.damage or 0))
    return measured + [u for u in ranked if u.damage is None]


def _sensitivity_pass(
    search: _Search, settings: QuantSettings, prepared: Any, nodes: list[tuple[str, str]]
) -> list[_Unit]:
    """One quantization and one run of each graph: every unit ranked by damage."""
    record = search.begin("sensitivity", settings, candidate=False)
    start = time.perf_counter()
    granularity, units = _sensitivity_units(nodes, search.budget)
    by_name = {n.name: n for n in prepared.graph.node}
    names = sorted({t for name, _ in nodes for t in (*by_name[name].input, *by_name[name].output)})
    try:
        # QDQ and uncompacted: its float tensors carry the fp32 graph's names.
        probe = replace(settings, quant_format="qdq") if settings.mode == "static" else settings
        int8, _ = search.quantize(probe, compact=False)
        errors = tensor_errors(prepared, int8, search.feeds, names, search.budget.threads)
    except Exception as exc:  # the base graph could be quantized once; say why not now
        record.update(error=_message(exc), passed=False, score=None, granularity=granularity)
        search.report(record)
        return []
    ranking = rank_units(prepared, errors, units)
    record.update(
        granularity=granularity,
        ranking=[{"unit": u.unit, "nodes": list(u.names), "damage": u.damage} for u in ranking],
        seconds=time.perf_counter() - start,
    )
    search.report(record)
    return ranking


def _exclusion_phase(search: _Search, base: dict[str, Any], prepared: Any) -> None:
    settings = QuantSettings(**{k: v for k, v in base["settings"].items() if "nodes" not in k})
    nodes = candidate_nodes(prepared, settings.mode)
    if len(nodes) < 2 or search.budget.max_excluded_nodes == 0:
        search.stop("trials_exhausted", "no node can be left in float")
        return
    ranking = _sensitivity_pass(search, settings, prepared, nodes)
    hurting = [u for u in ranking if u.damage is None or u.damage > DAMAGE_FLOOR]
    cap = min(search.budget.max_excluded_nodes, len(nodes) - 1)
    prefixes: list[tuple[str, ...]] = []  # prefixes[k - 1]: the nodes of the k first units
    for unit in hurting:
        names = (*(prefixes[-1] if prefixes else ()), *unit.names)
        if len(names) > cap:
            break
        prefixes.append(names)
    if not prefixes:
        search.stop(
            "exclusion_cap",
            f"the most damaging unit alone has more nodes than the cap ({cap})"
            if hurting
            else "the sensitivity pass found no node that hurts parity",
        )
        return

    def excluded(k: int) -> bool:
        record = search.run("exclude", replace(settings, nodes_to_exclude=prefixes[k - 1]))
        record["units_in_float"] = k
        return bool(record.get("passed"))

    # Galloping: k = 1, 2, 4, ... up to the cap until one passes (a lone culprit costs one
    # trial), then bisect between the last failing and the first passing k.
    low, high = 0, 1  # the base itself, with nothing in float, failed in the grid
    while not excluded(high):
        if high == len(prefixes):
            search.stop(
                "exclusion_cap",
                f"still failing with the {len(prefixes[-1])} most damaging nodes in float "
                f"(max_excluded_nodes {search.budget.max_excluded_nodes})",
            )
            return
        low, high = high, min(2 * high, len(prefixes))
    while high - low > 1:
        middle = (low + high) // 2
        if excluded(middle):
            high = middle
        else:
            low = middle
    search.stop(
        "cannot_beat_best",
        f"{high} unit(s) in float pass and {low} fail: no untried exclusion set is smaller",
    )


def _verdict(search: _Search, chosen: dict[str, Any], *, passed: bool) -> Verdict:
    numbers = chosen["reason"].split(": ", 1)[-1]
    ratio = chosen["compression_ratio"]
    size = f"{search.fp32_size:,} -> {chosen['size_bytes']:,} bytes ({ratio:.2f}x smaller)"
    tried = f"{len(search.trials)} trials; stopped: {search.stopped}"
    if passed:
        return Verdict(True, f"int8 search chose {chosen['label']}: {numbers}; {size}; {tried}")
    return Verdict(
        False,
        f"int8 search: no setting passed the {search.kind} parity gate in {tried}; best so "
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
    batch_sizes: list[int] | None = None,
    progress: Progress | None = None,
) -> SearchResult:
    """Find the smallest int8 graph that passes the parity thresholds; see the module doc.

    batch_sizes: rows per ONNX Runtime call each trial is judged at (default 1).
    progress: called with a short dict after every trial.
    """
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
        batch_sizes=sorted(set(batch_sizes or [1])),
        progress=progress,
    )
    skipped: list[dict[str, Any]] = []
    try:
        like = transformer_like(onnx.load(str(source), load_external_data=False))
        for settings in grid_settings(static=bool(calibration), transformer_like=like):
            twin = next(
                (
                    t
                    for t in search.candidates()
                    if t["passed"]
                    and size_class(QuantSettings(**t["settings"])) == size_class(settings)
                ),
                None,
            )
            if twin is not None:
                skipped.append(
                    {"label": settings.label(), "settings": settings.as_dict(), "as": twin["trial"]}
                )
                continue
            search.run("grid", settings)
        if search.smallest_passing() is not None:
            search.stop(
                "cannot_beat_best",
                "a whole-graph setting passed: leaving nodes in float only adds bytes",
            )
        else:
            base = search.exclusion_base()
            if base is not None:
                _exclusion_phase(search, base, onnx.load(str(source)))
    except _Stop:
        pass
    chosen = search.smallest_passing()
    passed = chosen is not None
    chosen = chosen or search.best_scoring()
    common: dict[str, Any] = {
        "kind": kind,
        "kind_reason": why,
        "fp32": fp32_info,
        "trials": search.trials,
        "pre_process": pre_process,
        "batch_sizes": search.batch_sizes,
        "stop_reason": search.stop_reason,
        "stopped": search.stopped,
        "skipped": skipped,
    }
    if chosen is None:
        errors = sorted({t["error"] for t in search.trials if t.get("error")})
        reason = (
            f"int8 search: none of {len(search.trials)} settings could be quantized "
            f"(stopped: {search.stopped})" + (f": {errors[:3]}" if errors else "")
        )
        return SearchResult(model=None, chosen=None, verdict=Verdict(False, reason), **common)
    chosen["chosen"] = True
    return SearchResult(
        model=search.kept[chosen["trial"]],
        chosen=chosen,
        verdict=_verdict(search, chosen, passed=passed),
        **common,
    )


def parity_report(result: SearchResult, thresholds: GateThresholds) -> dict[str, Any] | None:
    """The parity numbers of the chosen graph, or of the best so far when none passed."""
    chosen = result.chosen
    if chosen is None:
        return None
    return {
        "graph": "chosen" if result.verdict.passed else "best so far (no setting passed)",
        "trial": chosen["trial"],
        "label": chosen["label"],
        "settings": chosen["settings"],
        "kind": result.kind,
        "kind_reason": result.kind_reason,
        "passed": chosen["passed"],
        "reason": chosen["reason"],
        "thresholds": thresholds_of(result.kind, thresholds),
        "batch_sizes": result.batch_sizes,
        "batch_size": chosen["batch_size"],
        "by_batch_size": chosen["by_batch_size"],
        **chosen["parity"],
        "worst_output": chosen["worst_output"],
        "worst_rows": chosen["worst_rows"],
        "size_bytes": chosen["size_bytes"],
        "compression_ratio": chosen["compression_ratio"],
        "fp32": result.fp32,
        "stop_reason": result.stop_reason,
        "stopped": result.stopped,
    }
