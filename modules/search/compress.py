"""The `compress` step: one call from a model and a budget to a deployable, parity-gated ONNX.

A search over chains of registered steps, not single steps:

1. **Chains.** Each registered chain source (`chain_source`) proposes native chains for
   the input model (torch: distillation into narrower students whose widths come from the
   teacher, structured pruning at several levels, low-rank, distil -> prune; scikit-learn:
   prototypes, forest and feature pruning), each built only from steps that are registered
   and accept the model. The empty chain (the input itself) is always one. Each chain is
   then given every ONNX ending a tail source proposes (fp32 export; ONNX Runtime int8,
   dynamic and static, and fp16 compute where the graph has something to convert). A kind
   that does not apply to the model is a `Skipped` entry with its reason, listed in
   compress.json (`skipped`), not silently absent.
2. **Proxies.** Every native chain first runs as a cheap proxy (fine-tuning and
   distillation cut to `proxy_epochs`); they are ranked (accuracy within the floor minus
   `proxy_slack_pt`, then the objective).
3. **Endings first.** The endings cost seconds and multiply the ratio (int8 ~4x, fp16 2x),
   so they are never left for the end: the chains with nothing to train (the input itself,
   prototypes, forests) are gated at once, which gives a parity-passing best-so-far before
   any fine-tuning is spent; and every chain that is fully trained has all its endings
   gated right after its training, whatever the clock says.
4. **Successive halving for the expensive part.** Only the best `1/eta` (at least
   `finalists`) of the chains that train are run again with their full fine-tuning, best
   proxy first. No full run starts after (1 - `gate_share`) x `max_time_s`, nor one whose
   estimated length (its proxy's time x the epoch ratio) exceeds the time left.
5. **Gate.** Every finalist x ending goes through `onnx_export`, the ending's steps, the
   parity check of the ONNX graph against its native model (`onnx_parity`'s check) and
   `hardware_sim` on the job's profile; its ONNX file is measured (size, accuracy,
   batch-1 latency with CI, memory, energy estimate) and checked against the budget with
   `auto.violations`. Only a candidate that passed parity and every budget check can win;
   among those the smallest `objective` wins (auto's rule: overlapping latency CIs tie).

When no candidate meets the goal, the step's verdict fails (the job ends `rejected`) and the
output is the best-so-far parity-passing ONNX with the numbers and the reason. Torch int8
(`quantize_dynamic`) modules do not export to ONNX, so the int8 stage of a chain runs in
ONNX Runtime.

A new technique becomes a candidate by registering a chain or tail source here; the
search itself does not change.
"""

from __future__ import annotations

import html
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from modules.core.artifact import ModelArtifact
from modules.core.registry import get_step, list_steps, register_step
from modules.core.step import (
    StepContext,
    StepOutput,
    Verdict,
    check_cancelled,
    report_progress,
)
from modules.errors import IncompatibleError, McaasError
from modules.evaluation.measure import MeasureParams
from modules.evaluation.pareto import DEFAULT_MAXIMIZE, DEFAULT_MINIMIZE, pareto_front
from modules.evaluation.plots import pareto_figure, render, waterfall_figure
from modules.evaluation.stats import compare_latency
from modules.search.auto import (
    OBJECTIVE_KEYS,
    AccuracyGoalFields,
    accuracy_floor,
    beats,
    violations,
)
from modules.search.sweep import (
    CandidateRejected,
    apply_steps,
    candidate_row,
    step_params,
    sub_context,
)
from modules.storage.datasets import Dataset
from modules.storage.model_formats import save_model

# Params that set how long a step trains; a proxy run caps them at proxy_epochs.
EPOCH_PARAMS = ("finetune_epochs", "epochs")


@dataclass(frozen=True)
class StageCall:
    """One step of a chain: a registered step name and its params."""

    step: str
    params: dict[str, Any] = field(default_factory=dict)

    def label(self) -> str:
        shown = {k: v for k, v in self.params.items() if k not in EPOCH_PARAMS}
        inner = ", ".join(f"{k}={v}" for k, v in shown.items())
        return f"{self.step}({inner})" if inner else self.step


@dataclass(frozen=True)
class Chain:
    """A sequence of native steps (empty: the input model as it is)."""

    stages: tuple[StageCall, ...] = ()

    def label(self) -> str:
        return " -> ".join(s.label() for s in self.stages) or "input"

    def with_epochs(self, cap: int, *, distill_cap: int) -> Chain:
        """The same chain with every training length capped (the proxy)."""
        stages = []
        for stage in self.stages:
            params = dict(stage.params)
            limit = distill_cap if stage.step == "distill" else cap
            for key in EPOCH_PARAMS:
                if key in params:
                    params[key] = min(int(params[key]), limit)
            stages.append(StageCall(stage.step, params))
        return Chain(tuple(stages))


@dataclass(frozen=True)
class Tail:
    """What happens after the ONNX export: e.g. nothing (fp32) or ONNX Runtime int8."""

    name: str
    stages: tuple[StageCall, ...] = ()


@dataclass(frozen=True)
class Skipped:
    """A kind of candidate a source did not propose for this model, and why (compress.json)."""

    kind: str
    why: str


ChainSource = Callable[[ModelArtifact, Dataset, set[str]], list[Chain | Skipped]]
TailSource = Callable[[ModelArtifact, set[str]], list[Tail | Skipped]]
# The search's clock: one name, so a test can give it a fake one.
_clock = time.perf_counter
_CHAIN_SOURCES: list[ChainSource] = []
_TAIL_SOURCES: list[TailSource] = []


def chain_source(fn: ChainSource) -> ChainSource:
    """Register a function that proposes native chains for a model (given registered steps)."""
    _CHAIN_SOURCES.append(fn)
    return fn


def tail_source(fn: TailSource) -> TailSource:
    """Register a function that proposes ONNX tails for a model (given registered steps)."""
    _TAIL_SOURCES.append(fn)
    return fn


def _accepting(framework: str) -> set[str]:
    return {s.name for s in list_steps() if framework in s.accepts}


def student_widths(model: ModelArtifact, data: Dataset) -> list[list[int]]:
    """Hidden widths of narrower students, derived from the teacher.

    A zoo MLP teacher gives the same depth at 1/4 of each width, one layer at 1/4 and one
    layer at 1/16 of the first width; any other teacher gives one-hidden-layer MLPs with
    about 1/16 and 1/64 of its parameters.
    """
    arch = model.meta.get("zoo_arch") or {}
    hidden = arch.get("hidden") if arch.get("name") == "mlp" else None
    if hidden:
        first = int(hidden[0])
        options = [[max(8, int(w) // 4) for w in hidden], [max(8, first // 4)]]
        options.append([max(8, first // 16)])
    else:
        n_params = sum(int(p.numel()) for p in model.obj.parameters())
        per_unit = data.n_features + data.n_classes + 1
        options = [[max(8, n_params // 16 // per_unit)], [max(8, n_params // 64 // per_unit)]]
    unique: list[list[int]] = []
    for widths in options:
        if widths not in unique:
            unique.append(widths)
    return unique


@chain_source
def torch_chains(model: ModelArtifact, data: Dataset, steps: set[str]) -> list[Chain | Skipped]:
    """Distil, prune, low-rank and their chains, from the steps that accept a torch model."""
    if model.framework != "torch":
        return []
    prune = "prune_structured" in steps
    chains: list[Chain | Skipped] = []
    if prune:
        for amount in (0.5, 0.75):
            chains.append(
                Chain((StageCall("prune_structured", {"method": "structured", "amount": amount}),))
            )
    if "lowrank" in steps:
        chains.append(Chain((StageCall("lowrank", {"rank_rule": "ratio", "ratio": 0.25}),)))
    if "distill" in steps:
        for i, widths in enumerate(student_widths(model, data)):
            arch = {"name": "mlp", "hidden": widths}
            # lr 3e-3: the KD recipe benchmarks/results/torch_compression.md measured.
            student = StageCall("distill", {"student_arch": arch, "lr": 3e-3})
            chains.append(Chain((student,)))
            # The two widest students also get structured 50% (the hand-written chain of
            # torch_compression.md is a one-layer student, pruned, then int8).
            if prune and i < 2:
                half = StageCall("prune_structured", {"method": "structured", "amount": 0.5})
                chains.append(Chain((student, half)))
    if prune:
        chains.append(
            Skipped(
                "prune_structured(method=unstructured) => onnx int8",
                "ONNX stores the pruned weights dense and ONNX Runtime's CPU kernels do the "
                "same work on zeros, so unstructured sparsity shrinks neither the handed-back "
                "file nor its latency (benchmarks/results/torch_compression.md: unstructured "
                "90% is 1.0x size, no speedup); int8 and fp16 of the dense graphs are searched",
            )
        )
    if "quantize_dynamic" in steps:
        chains.append(
            Skipped(
                "quantize_dynamic (torch int8)",
                "torch quantized modules do not export to ONNX; int8 runs in ONNX Runtime "
                "instead (the onnx int8 endings)",
            )
        )
    return chains


@chain_source
def sklearn_chains(model: ModelArtifact, data: Dataset, steps: set[str]) -> list[Chain | Skipped]:
    """Prototype, forest and feature pruning for a scikit-learn model, by its estimator."""
    if model.framework != "sklearn":
        return []
    final = getattr(model.obj, "steps", [[None, model.obj]])[-1][1]
    name = type(final).__name__
    chains: list[Chain | Skipped] = []
    if "KNeighbors" in name and "knn_prototypes" in steps:
        for ratio in (0.05, 0.1, 0.2):
            chains.append(
                Chain((StageCall("knn_prototypes", {"method": "kmeans", "ratio": ratio}),))
            )
    elif hasattr(final, "estimators_") and "forest_prune" in steps:
        # Shares of the forest's own trees (on digits, 100 trees: 30 keep the 1 pt floor).
        have = len(final.estimators_)
        counts = sorted({max(1, round(have * share)) for share in (0.05, 0.1, 0.2, 0.3, 0.5)})
        for n_trees in (c for c in counts if c < have):
            chains.append(Chain((StageCall("forest_prune", {"n_trees": n_trees}),)))
    if "feature_prune" in steps and hasattr(final, "coef_"):
        for keep in (0.5, 0.75):
            chains.append(Chain((StageCall("feature_prune", {"keep_ratio": keep}),)))
    return chains


@tail_source
def onnx_tails(model: ModelArtifact, steps: set[str]) -> list[Tail | Skipped]:
    """fp32 ONNX always; ONNX Runtime int8 (dynamic, static) and fp16 for torch graphs."""
    tails: list[Tail | Skipped] = [Tail("onnx fp32")]
    onnx_steps = _accepting("onnx")
    if model.framework == "torch":
        if "onnx_quantize" in onnx_steps:
            for mode in ("dynamic", "static"):
                stage = StageCall("onnx_quantize", {"mode": mode})
                tails.append(Tail(f"onnx int8 {mode}", (stage,)))
        if "onnx_float16" in onnx_steps:
            tails.append(Tail("onnx fp16", (StageCall("onnx_float16"),)))
    elif model.framework == "sklearn":
        tails.append(
            Skipped(
                "onnx int8",
                "skl2onnx graphs have no MatMul, Gemm or Conv weights for ONNX Runtime to "
                "quantize (trees, linear models and KNN are ai.onnx.ml operators or Scan bodies)",
            )
        )
        tails.append(
            Skipped(
                "onnx fp16",
                "skl2onnx graphs use ai.onnx.ml operators, which have no float16 types; "
                "precision reduction of scikit-learn models is the `precision` step's",
            )
        )
    return tails


class CompressParams(AccuracyGoalFields):
    """Params of the `compress` step."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    objective: Literal["size", "latency", "energy"] = Field(
        default="size", description="What the winner minimizes among the candidates that pass."
    )
    max_time_s: float = Field(
        default=600.0,
        gt=0,
        le=86_400,
        description="No new candidate starts after this many seconds (the best finalist "
        "always gets its ONNX gate).",
    )
    finetune_epochs: int = Field(
        default=10, ge=0, le=500, description="Fine-tuning epochs of a full (non-proxy) run."
    )
    distill_epochs: int = Field(
        default=30, ge=1, le=1000, description="Distillation epochs of a full (non-proxy) run."
    )
    proxy_epochs: int = Field(
        default=1, ge=1, le=50, description="Training epochs of the cheap proxy round."
    )
    proxy_distill_epochs: int = Field(
        default=5,
        ge=1,
        le=100,
        description="Distillation epochs of the proxy round (a student starts from scratch, "
        "so one epoch says nothing).",
    )
    proxy_slack_pt: float = Field(
        default=5.0,
        ge=0,
        le=100,
        description="A proxy this many points below the floor may still reach it after full "
        "fine-tuning, so it stays in the race.",
    )
    eta: int = Field(
        default=2, ge=2, le=10, description="Successive halving keeps 1/eta of the proxies."
    )
    gate_share: float = Field(
        default=0.25,
        ge=0,
        lt=1,
        description="Share of max_time_s kept for the ONNX gate: no training run starts "
        "after (1 - gate_share) x max_time_s.",
    )
    finalists: int = Field(
        default=3, ge=1, le=50, description="Fewest chains fully trained and ONNX-gated."
    )
    min_agreement: float = Field(
        default=0.98, ge=0, le=1, description="Parity gate: minimum ONNX/native label agreement."
    )
    max_prob_diff: float = Field(
        default=0.1,
        ge=0,
        le=1,
        description="Parity gate: largest |probability difference| ONNX vs native.",
    )
    warmup: int = Field(default=3, ge=0, le=1000, description="Untimed runs before timing.")
    runs: int = Field(default=10, ge=2, le=10_000, description="Timed runs per candidate.")


@dataclass
class Candidate:
    """One chain x tail, with what happened to it."""

    chain: Chain
    tail: Tail | None
    phase: str
    row: dict[str, Any] = field(default_factory=dict)
    native: ModelArtifact | None = None
    native_row: dict[str, Any] | None = None
    onnx: ModelArtifact | None = None
    parity: dict[str, Any] | None = None
    hardware: dict[str, Any] | None = None
    lost: str | None = None

    def label(self) -> str:
        tail = f" => {self.tail.name}" if self.tail is not None else ""
        return self.chain.label() + tail

    def describe(self) -> dict[str, Any]:
        return {
            "label": self.label(),
            "phase": self.phase,
            "chain": [{"step": s.step, "params": s.params} for s in self.chain.stages],
            "tail": None
            if self.tail is None
            else [{"step": s.step, "params": s.params} for s in self.tail.stages],
            **{k: v for k, v in self.row.items() if k not in ("label", "chain")},
            "parity": self.parity,
            "hardware_sim": self.hardware,
            "lost_because": self.lost,
        }


def _full(chain: Chain, params: CompressParams) -> Chain:
    """The chain with the full training lengths this search was given."""
    stages = []
    for stage in chain.stages:
        extra: dict[str, Any] = {}
        fields = get_step(stage.step).params.model_fields
        if stage.step == "distill":
            extra["epochs"] = params.distill_epochs
        elif "finetune_epochs" in fields:
            extra["finetune_epochs"] = params.finetune_epochs
        stages.append(StageCall(stage.step, {**stage.params, **extra}))
    return Chain(tuple(stages))


def _calls(stages: Sequence[StageCall]) -> list[tuple[str, BaseModel]]:
    return [(s.step, step_params(s.step, s.params, who="compress")) for s in stages]


def _run_native(
    model: ModelArtifact,
    data: Dataset,
    chain: Chain,
    ctx: StepContext,
    *,
    measure: MeasureParams,
    tag: str,
) -> tuple[ModelArtifact | None, dict[str, Any]]:
    """Run a chain's native steps and measure the result; errors become a row's `error`.

    The row's `stages` holds the size and batch-1 latency after each step (the waterfall).
    """
    t0 = time.perf_counter()
    stages: list[dict[str, Any]] = []
    try:
        artifact = model
        for i, stage in enumerate(chain.stages):
            artifact, _ = apply_steps(
                artifact, data, _calls([stage]), ctx, seed=ctx.seed, tag=f"{tag}-{i}"
            )
            if i < len(chain.stages) - 1:
                row = candidate_row(artifact, data, profile=ctx.profile, measure=measure)
                stages.append(_stage_point(stage.label(), row))
        row = candidate_row(artifact, data, profile=ctx.profile, measure=measure)
    except McaasError as exc:
        return None, {"error": f"{type(exc).__name__}: {exc}", "run_time_s": 0.0}
    if chain.stages:
        stages.append(_stage_point(chain.stages[-1].label(), row))
    row["stages"] = stages
    row["run_time_s"] = time.perf_counter() - t0
    return artifact, row


def _stage_point(step: str, row: dict[str, Any]) -> dict[str, Any]:
    return {"step": step, "size_bytes": row["size_bytes"], "latency_ms": row["latency_ms"]}


def _gate(
    cand: Candidate,
    data: Dataset,
    ctx: StepContext,
    params: CompressParams,
    *,
    measure: MeasureParams,
    floor: float,
    tag: str,
) -> None:
    """Export, tail, parity and hardware_sim for one finalist x tail; fills the candidate."""
    from modules.deployment.parity import ParityParams, check_parity

    t0 = time.perf_counter()
    try:
        if cand.native is None or cand.tail is None:
            raise IncompatibleError("a gate candidate needs a native model and a tail")
        calls = [("onnx_export", step_params("onnx_export", {}, who="compress"))]
        calls += _calls(cand.tail.stages)
        onnx, step_metrics = apply_steps(cand.native, data, calls, ctx, seed=ctx.seed, tag=tag)
        if onnx.framework != "onnx":
            raise IncompatibleError("the ONNX export produced no ONNX graph")
        for name, metrics in step_metrics.items():
            if name == "onnx_quantize" and not metrics.get("quantized"):
                raise IncompatibleError(f"onnx_quantize: {metrics.get('note', 'no change')}")
        parity_params = ParityParams(
            min_agreement=params.min_agreement,
            max_prob_diff=params.max_prob_diff,
            warmup=1,
            runs=3,
        )
        report, verdict = check_parity(cand.native, onnx, data, parity_params)
        cand.parity = {
            "passed": verdict.passed,
            "reason": verdict.reason,
            "agreement": report.get("agreement"),
            "max_abs_prob_diff": report.get("max_abs_prob_diff"),
            "report": report,
        }
        sim_params = step_params("hardware_sim", {"warmup": 1, "runs": 3}, who="compress")
        sim = get_step("hardware_sim").fn(
            onnx, data, sim_params, sub_context(ctx, name="hardware_sim", seed=ctx.seed, tag=tag)
        )
        cand.hardware = {
            k: sim.metrics.get(k) for k in ("fits", "verdict", "fit_reasons", "auto_batch")
        }
        row = candidate_row(onnx, data, profile=ctx.profile, measure=measure)
    except (McaasError, CandidateRejected) as exc:
        cand.row = {"error": f"{type(exc).__name__}: {exc}"}
        cand.lost = f"failed: {exc}"
        return
    cand.onnx = onnx
    row["gate_time_s"] = time.perf_counter() - t0
    row["violations"] = violations(row, floor=floor, profile=ctx.profile)
    if not cand.parity["passed"]:
        row["violations"].insert(0, f"parity: {cand.parity['reason']}")
    cand.row = row


def _training_ratio(proxy: Chain, full: Chain) -> float:
    """How many times longer the full chain trains than its proxy (the largest stage ratio)."""
    ratio = 1.0
    for short, long in zip(proxy.stages, full.stages, strict=True):
        for key in EPOCH_PARAMS:
            if key in long.params and short.params.get(key):
                ratio = max(ratio, int(long.params[key]) / int(short.params[key]))
    return ratio


def _latency_stat(row: dict[str, Any]) -> dict[str, Any]:
    return {"median": row["latency_ms"], "median_ci95": row["latency_ci95"]}


def _proxy_key(row: dict[str, Any], *, floor: float, slack: float, objective: str) -> tuple:
    if "error" in row:
        return (2.0, 0.0, 0.0)
    close = row["accuracy"] >= floor - slack / 100.0
    if close:
        return (0.0, float(row[OBJECTIVE_KEYS[objective]]), -float(row["accuracy"]))
    return (1.0, -float(row["accuracy"]), 0.0)


def _progress(phase: str, done: int, total: int, cand: Candidate) -> None:
    """One line per candidate for the CLI bar and the dashboard's job events."""
    outcome = cand.lost or ("error" if "error" in (cand.row or {}) else "done")
    report_progress(
        {
            "text": f"{phase} {done}/{total}: {cand.label()} ({outcome})",
            "phase": phase,
            "done": done,
            "total": total,
        }
    )


@register_step("compress", params=CompressParams, accepts={"torch", "sklearn"}, gate=True)
def compress(
    model: ModelArtifact, data: Dataset, params: CompressParams, ctx: StepContext
) -> StepOutput:
    """Compress to a budget: a chained search whose winner is a parity-gated ONNX model."""
    start = _clock()

    def elapsed() -> float:
        return _clock() - start

    def out_of_time(share: float = 1.0) -> bool:
        check_cancelled()  # asked before every candidate: a stopped job stops its search here
        return elapsed() > share * params.max_time_s

    # Training stops starting new runs early enough to leave the ONNX gate its share.
    train_share = 1.0 - params.gate_share

    measure = MeasureParams(batch_sizes=[1], warmup=params.warmup, runs=params.runs)
    proxy_measure = MeasureParams(batch_sizes=[1], warmup=1, runs=3)
    _, baseline = _run_native(model, data, Chain(), ctx, measure=measure, tag="input")
    if "error" in baseline:
        raise IncompatibleError(f"the input model cannot be measured: {baseline['error']}")
    floor = accuracy_floor(
        baseline["accuracy"], max_drop=params.max_drop, drop_kind=params.drop_kind
    )
    steps = _accepting(model.framework)
    chains = [Chain()]
    skipped: list[Skipped] = []
    for source in _CHAIN_SOURCES:
        for proposed in source(model, data, steps):
            if isinstance(proposed, Skipped):
                skipped.append(proposed)
            elif proposed not in chains:
                chains.append(proposed)
    tails: list[Tail] = []
    for tail_src in _TAIL_SOURCES:
        for tail_item in tail_src(model, steps):
            if isinstance(tail_item, Skipped):
                skipped.append(tail_item)
            else:
                tails.append(tail_item)
    candidates: list[Candidate] = []
    gated: list[Candidate] = []
    stopped_by = "exhausted"
    n_gates = 0

    def gate_all(fin: Candidate, *, always: bool) -> None:
        """Every ending of one native finalist, right after it is ready (seconds each).

        The endings are cheap and multiply the ratio (int8 ~4x, fp16 2x), so they are never
        left for the end: `always` (the first finalist, and any finalist whose training
        was paid for) ignores max_time, so a trained chain is never left without them.
        """
        nonlocal stopped_by, n_gates
        for tail in tails:
            cand = Candidate(fin.chain, tail, "gate", native=fin.native, native_row=fin.row)
            if not always and out_of_time():
                cand.lost = "not gated: max_time reached"
                stopped_by = "max_time"
            else:
                _gate(cand, data, ctx, params, measure=measure, floor=floor, tag=f"g{n_gates}")
            n_gates += 1
            candidates.append(cand)
            _progress("ONNX gate", n_gates, max(n_gates, gate_total), cand)
            if cand.onnx is not None:
                gated.append(cand)
        fin.lost = fin.lost or "native finalist; see its ONNX candidates"

    # Round 1: every chain as a cheap proxy.
    proxies: list[Candidate] = []
    for n, chain in enumerate(chains):
        full = _full(chain, params)
        proxy = full.with_epochs(params.proxy_epochs, distill_cap=params.proxy_distill_epochs)
        cand = Candidate(full, None, "proxy")
        if out_of_time(train_share) and n:
            cand.lost = "not run: max_time reached"
            stopped_by = "max_time"
        else:
            cand.native, cand.row = _run_native(
                model, data, proxy, ctx, measure=proxy_measure, tag=f"p{n}"
            )
            cand.row["trained_as_proxy"] = proxy != full
            if proxy != full:
                cand.row["full_run_estimate_s"] = cand.row["run_time_s"] * _training_ratio(
                    proxy, full
                )
        proxies.append(cand)
        _progress("proxy", n + 1, len(chains), cand)
    candidates += proxies
    ran = [c for c in proxies if c.row]
    ran.sort(
        key=lambda c: _proxy_key(
            c.row, floor=floor, slack=params.proxy_slack_pt, objective=params.objective
        )
    )
    for c in ran:
        if "error" in c.row:
            c.lost = "failed: " + c.row["error"]
    ok = [c for c in ran if "error" not in c.row]
    # A chain with nothing to train is already final: its proxy is its full run.
    ready = [c for c in ok if not c.row.get("trained_as_proxy")]
    trainable = [c for c in ok if c.row.get("trained_as_proxy")]
    # Successive halving applies to the expensive part, the full training runs.
    keep = max(params.finalists, math.ceil(len(trainable) / params.eta))
    for c in trainable[keep:]:
        c.lost = f"cut by successive halving (proxy accuracy {c.row['accuracy']:.4f})"
    survivors = trainable[:keep]
    gate_total = (len(ready) + len(survivors)) * len(tails)  # at most this many

    # Round 2: the chains with nothing to train get their endings first: a gated
    # best-so-far within seconds, before any fine-tuning is spent.
    for n, fin in enumerate(ready):
        gate_all(fin, always=n == 0)

    # Round 3: full training, best proxy first; each trained chain's endings right after it.
    n_trained = 0
    for proxy_cand in survivors:
        estimate = float(proxy_cand.row.get("full_run_estimate_s", 0.0))
        left = train_share * params.max_time_s - elapsed()
        if out_of_time(train_share) or (n_trained and estimate > left):
            why = "max_time reached" if left <= 0 else f"needs ~{estimate:.0f} s, {left:.0f} s left"
            proxy_cand.lost = f"not fully trained: {why}"
            stopped_by = "max_time"
            continue
        cand = Candidate(proxy_cand.chain, None, "full")
        cand.native, cand.row = _run_native(
            model, data, proxy_cand.chain, ctx, measure=proxy_measure, tag=f"f{n_trained}"
        )
        n_trained += 1
        proxy_cand.lost = "superseded by its fully trained run"
        candidates.append(cand)
        _progress("full training", n_trained, len(survivors), cand)
        if cand.native is None:
            cand.lost = "failed: " + cand.row["error"]
            continue
        gate_all(cand, always=True)
    if not gated and not ready:
        # Nothing trained within the time and nothing ready: gate the best proxy as it is.
        for fin in survivors[:1]:
            gate_all(fin, always=True)

    passed_parity = [c for c in gated if c.parity and c.parity["passed"]]
    pool = passed_parity or gated
    # As auto chooses: latency CIs that overlap are a tie, settled by accuracy, then size.
    winner = pool[0] if pool else None
    for cand in pool[1:]:
        if winner is not None and beats(cand.row, winner.row, params.objective):
            winner = cand
    met = winner is not None and not winner.row["violations"]
    for cand in gated:
        if cand is winner:
            continue
        if cand.row["violations"]:
            cand.lost = "; ".join(cand.row["violations"])
        else:
            key = OBJECTIVE_KEYS[params.objective]
            cand.lost = f"larger {params.objective} ({cand.row[key]:.4g}) than the winner"
    if winner is None:
        reason = "no candidate could be exported to ONNX: " + "; ".join(
            c.lost or "" for c in candidates if c.phase == "gate"
        )
    elif met:
        reason = (
            f"winner {winner.label()}: passes parity, fits profile {ctx.profile.name} and the "
            f"accuracy floor {floor:.4f} with the smallest {params.objective} "
            f"({winner.row[OBJECTIVE_KEYS[params.objective]]:.4g})"
        )
    else:
        reason = (
            f"no candidate met the goal on profile {ctx.profile.name}; best-so-far "
            f"{winner.label()} misses: " + "; ".join(winner.row["violations"])
        )
    summary = _summary(
        baseline, winner, met=met, reason=reason, floor=floor, params=params, ctx=ctx
    )
    summary.update(
        stopped_by=stopped_by,
        elapsed_s=elapsed(),
        skipped=[{"kind": k.kind, "why": k.why} for k in skipped],
        n_candidates=len(candidates),
        n_gated=len(gated),
    )
    rows = [{"label": "input", **baseline}] + [
        {"label": c.label(), **c.row} for c in gated if "error" not in c.row
    ]
    front = pareto_front(rows, minimize=DEFAULT_MINIMIZE, maximize=DEFAULT_MAXIMIZE)
    summary["pareto_front"] = [rows[i]["label"] for i in front]
    for i, row in enumerate(rows):
        row["pareto"] = i in front
        row["best"] = winner is not None and row["label"] == winner.label()
    described = [c.describe() for c in candidates]
    for item in described:
        item["winner"] = (
            winner is not None and item["label"] == winner.label() and (item["phase"] == "gate")
        )
    files: dict[str, bytes] = {
        "compress.json": json.dumps(
            {**summary, "candidates": described}, indent=2, default=str
        ).encode()
    }
    if winner is not None and winner.native is not None and winner.parity is not None:
        files[f"native_model{winner.native.suffix}"] = save_model(winner.native)
        files["deployment_report.json"] = json.dumps(
            {**winner.parity["report"], "hardware_sim": winner.hardware, "compress": summary},
            indent=2,
            default=str,
        ).encode()
    waterfall = _waterfall(winner, winner.native_row if winner else None, baseline)
    summary["waterfall"] = waterfall
    figures = {
        "pareto": pareto_figure(
            [
                {
                    **r,
                    "label": ("* " if winner and r["label"] == winner.label() else "") + r["label"],
                }
                for r in rows
            ],
            front,
        ),
        "waterfall": waterfall_figure(waterfall),
    }
    rendered = {name: render(fig) for name, fig in figures.items()}
    for name, blobs in rendered.items():
        for fmt, blob in blobs.items():
            files[f"compress_{name}.{fmt}"] = blob
    files["report.html"] = report_html(summary, described, rendered).encode()
    metrics = {
        **summary,
        "accuracy": winner.row["accuracy"] if winner else None,
        "size_bytes": winner.row["size_bytes"] if winner else None,
        "rows": rows,
    }
    return StepOutput(
        model=winner.onnx if winner else None,
        metrics=metrics,
        files=files,
        verdict=Verdict(met, reason),
    )


def _summary(
    baseline: dict[str, Any],
    winner: Candidate | None,
    *,
    met: bool,
    reason: str,
    floor: float,
    params: CompressParams,
    ctx: StepContext,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "met_goal": met,
        "outcome": "completed" if met else "rejected",
        "reason": reason,
        "profile": ctx.profile.name,
        "objective": params.objective,
        "max_drop": params.max_drop,
        "drop_kind": params.drop_kind,
        "accuracy_floor": floor,
        "baseline": {k: baseline[k] for k in ("accuracy", "size_bytes", "latency_ms")},
        "winner": None,
    }
    if winner is not None:
        row = winner.row
        out["winner"] = {
            "label": winner.label(),
            "accuracy": row["accuracy"],
            "drop_pt": 100.0 * (baseline["accuracy"] - row["accuracy"]),
            "size_bytes": row["size_bytes"],
            "size_ratio": baseline["size_bytes"] / row["size_bytes"],
            "latency_ms": row["latency_ms"],
            "latency_ci95": row["latency_ci95"],
            "energy_mj_estimate": row["energy_mj_estimate"],
            # Native input vs the ONNX winner: a ratio only where the CIs do not overlap.
            "latency_vs_input": compare_latency(_latency_stat(baseline), _latency_stat(row)),
            "parity": {k: v for k, v in (winner.parity or {}).items() if k != "report"},
        }
    return out


def _waterfall(
    winner: Candidate | None, native_row: dict[str, Any] | None, baseline: dict[str, Any]
) -> list[dict[str, Any]]:
    """Size and latency after each stage of the winner's chain, from the input on."""
    points = [_stage_point("input", baseline)]
    if winner is None:
        return [{"index": 0, **points[0]}]
    points += (native_row or {}).get("stages", [])
    points.append(_stage_point(winner.tail.name if winner.tail else "onnx", winner.row))
    return [{"index": i, **p} for i, p in enumerate(points)]


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape("" if value is None else str(value))


def report_html(
    summary: dict[str, Any], candidates: list[dict[str, Any]], figures: dict[str, dict[str, bytes]]
) -> str:
    """The compress report: outcome, Pareto front, waterfall, every candidate and its verdicts."""
    head = "<h1>Compress to budget</h1>"
    status = "met" if summary["met_goal"] else "REJECTED"
    head += f"<p><b>Goal {status}</b>: {html.escape(summary['reason'])}</p>"
    if summary["winner"]:
        w = summary["winner"]
        head += (
            f"<p>Winner: <b>{html.escape(w['label'])}</b>, {w['size_ratio']:.1f}x smaller, "
            f"drop {w['drop_pt']:.2f} pt, latency vs input: "
            f"{html.escape(json.dumps(w['latency_vs_input']))}</p>"
        )
    svgs = "".join(
        f"<h2>{name}</h2><div>{blobs['svg'].decode()}</div>"
        for name, blobs in figures.items()
        if "svg" in blobs
    )
    cols = (
        "label",
        "phase",
        "size_bytes",
        "accuracy",
        "latency_ms",
        "latency_ci95",
        "energy_mj_estimate",
        "parity",
        "lost_because",
    )
    rows = []
    for c in candidates:
        cells = []
        for col in cols:
            value = c.get(col)
            if col == "parity":
                value = (
                    None
                    if value is None
                    else ("pass" if value["passed"] else "FAIL: " + value["reason"])
                )
            cells.append(f"<td>{_cell(value)}</td>")
        mark = ' style="background:#dfd"' if c.get("winner") else ""
        rows.append(f"<tr{mark}>{''.join(cells)}</tr>")
    table = (
        "<h2>Every candidate</h2><table border=1><tr>"
        + "".join(f"<th>{c}</th>" for c in cols)
        + "</tr>"
        + "".join(rows)
        + "</table>"
    )
    page_head = "<head><meta charset=utf-8><title>compress to budget</title></head>"
    return f"<!doctype html><html>{page_head}<body>{head}{svgs}{table}</body></html>"


def main(argv: list[str] | None = None) -> int:
    """`python -m modules.search.compress --input-model m.pt --output-model m.onnx`."""
    from modules.pipeline.script import ScriptOptions, script_main

    return script_main("compress", argv, ScriptOptions(aliases={"max_time_s": ["--max-time"]}))


if __name__ == "__main__":
    raise SystemExit(main())
