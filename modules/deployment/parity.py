"""The `onnx_parity` gate: the ONNX model must predict what the native model predicts.

Its input is the ONNX model; the reference is the newest earlier model of this job in the
framework the ONNX graph came from (`meta["source_framework"]`, else the newest torch or
scikit-learn one). Both predict the whole test split:

* label agreement = fraction of samples whose argmax labels are equal;
* max |prob diff| = the largest absolute difference between the two probability
  matrices (softmax of the logits for torch graphs).

The gate passes only when agreement >= min_agreement and max |prob diff| <= max_prob_diff.
It writes deployment_report.json: both numbers, the thresholds, the first mismatched test
indices, native vs ONNX Runtime latency (median and 95% CI, both on `threads` threads;
the speedup only where the two median CIs do not overlap, else None and a note), the
opsets and the library versions. A failed gate ends the job REJECTED with the reason;
it never raises.

Bring-your-own ONNX graphs (no native model in the job) are compared with the earlier ONNX
model of the job instead, e.g. the fp32 upload before onnx_quantize, on an inputs file
(`inputs`: one array per named graph input) or, for a standard (batch, n_features) graph,
the test split. The comparison depends on the output kind, declared (`output_kind`) or
inferred from the graph and its outputs:

* labels: agreement and max |prob diff|, as above;
* embedding: per-row cosine similarity (min and mean) and the max absolute error;
* regression: max absolute error, max relative error (|error| / max |reference| of the
  output) and R² of the outputs against the reference (mean over output columns).

The report names the worst rows and, for graphs with several outputs, the worst output.

How rows are fed: the candidate graph runs `b` rows per ONNX Runtime call for every `b` in
`batch_sizes` (default 1 and the profile's auto-batch, see deploy_batch_sizes), because
dynamic int8 computes activation scales per call and so a row's output depends on the rest
of its call. Each size is compared with the reference (run once) and the worst one decides;
the report has every size's numbers (`by_batch_size`) and how the sizes were chosen
(`batching`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping
from typing import Annotated, Any, cast

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from modules.core.artifact import ModelArtifact
from modules.core.registry import register_step
from modules.core.step import StepContext, StepOutput, Verdict
from modules.deployment.parity_metrics import (
    NATIVE_FRAMEWORKS,
    GateThresholds,
    batch_verdict,
    compare_outputs,
    compare_predictions,
    label_worst_rows,
    output_verdict,
    parity_verdict,
    resolve_kind,
    thresholds_of,
    worst_batch,
)
from modules.errors import BadInputError, IncompatibleError
from modules.evaluation.inference import OrtRunner, feed_batch, make_predictor
from modules.evaluation.measure import (
    DEFAULT_CI_TARGET,
    DEFAULT_MAX_TIME_S,
    TimingFields,
    batch_of,
    time_batches,
)
from modules.evaluation.stats import compare_latency
from modules.storage.datasets import Dataset
from modules.storage.inputs import (
    as_named_inputs,
    dataset_feeds,
    dataset_for_model,
    load_stored_inputs,
    model_input_specs,
    n_rows,
    onnx_inputs,
    onnx_outputs,
    prepare_feeds,
)
from modules.storage.keys import check_inputs_id


def inputs_param(value: str | None) -> str | None:
    """Validator body for an `inputs` param: None, or an id shaped like a server-made one."""
    if value is None:
        return None
    try:
        return check_inputs_id(value)
    except BadInputError as exc:
        raise ValueError(str(exc)) from None


MAX_BATCH_SIZES = 8
MAX_DEPLOY_BATCH = 65_536  # rows per call; as measure's latency_batch
# Rows per call at which an estimated auto-batch's memory is measured for the line fit.
MEMORY_PROBE_BATCHES = (1, 8)


class DeployBatches(BaseModel):
    """The `batch_sizes` field of the steps that judge a graph as it will be deployed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    batch_sizes: tuple[Annotated[int, Field(ge=1, le=MAX_DEPLOY_BATCH)], ...] | None = Field(
        default=None,
        max_length=MAX_BATCH_SIZES,
        description=(
            "Rows per ONNX Runtime call when outputs are compared; every size is checked and "
            "the worst one decides (dynamic int8 computes activation scales per call, so a "
            "row's output depends on the rest of its batch). none = 1 and the profile's "
            "auto-batch (an earlier hardware_sim step's, else estimated from the graph's "
            "memory on the profile's budget), each capped at the rows available."
        ),
    )

    @field_validator("batch_sizes")
    @classmethod
    def _sizes(cls, value: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("batch_sizes must name at least one size, or be none")
        return tuple(sorted(set(value)))


class ParityParams(GateThresholds, TimingFields, DeployBatches):
    """Params of the `onnx_parity` gate."""

    inputs: str | None = Field(
        default=None,
        max_length=64,
        description=(
            "Id of an inputs file (POST /v1/inputs): a .npz with one array per graph input, "
            "for graphs a dataset cannot feed; none = the dataset's test split."
        ),
    )
    worst_rows: int = Field(
        default=10, ge=0, le=1000, description="How many worst rows the report names."
    )
    mismatch_sample: int = Field(
        default=20, ge=0, le=1000, description="How many mismatched test indices to report."
    )
    latency_batch: int = Field(
        default=64, ge=1, le=65_536, description="Second batch size timed (batch 1 always is)."
    )
    threads: int | None = Field(
        default=1,
        ge=1,
        le=256,
        description=(
            "Threads for both sides of the latency comparison: 1 compares like with like, "
            "as on one edge core, and stays stable on a shared machine; none = each "
            "library's default."
        ),
    )

    @field_validator("inputs")
    @classmethod
    def _id_shape(cls, value: str | None) -> str | None:
        return inputs_param(value)


def time_feeds(
    fn: Callable[[Mapping[str, np.ndarray]], Any],
    feeds: Mapping[str, np.ndarray],
    *,
    sizes: list[int],
    warmup: int,
    runs: int,
    threads: int | None,
    ci_target: float = DEFAULT_CI_TARGET,
    max_time_s: float = DEFAULT_MAX_TIME_S,
) -> dict[str, Any]:
    """Latency summaries (ms) of `fn` on batches of each size, keyed b{size}."""
    out = {}
    for size in sizes:
        # time_batches only hands its batch to fn, so a dict of named arrays serves as well.
        batch = cast(Any, feed_batch(feeds, size))
        stat, _ = time_batches(
            fn, batch, warmup=warmup, runs=runs, ci_target=ci_target, max_time_s=max_time_s
        )
        out[f"b{size}"] = stat | {"batch_size": size, "threads": threads or "default"}
    return out


def speedups(
    slow: Mapping[str, dict[str, Any]], fast: Mapping[str, dict[str, Any]]
) -> dict[str, Any]:
    """`speedup_median` (slow / fast median per batch key) and, where the CIs overlap, a note.

    A batch whose two median CIs overlap has speedup None and a `speedup_median_note`
    entry: no measurable difference.
    """
    compared = {k: compare_latency(slow[k], fast[k]) for k in slow if k in fast}
    out: dict[str, Any] = {"speedup_median": {k: c["ratio"] for k, c in compared.items()}}
    notes = {k: c["note"] for k, c in compared.items() if not c["measurable"]}
    if notes:
        out["speedup_median_note"] = notes
    return out


def find_native_model(
    onnx_model: ModelArtifact, ctx: StepContext
) -> tuple[ModelArtifact, dict[str, Any]]:
    """The newest earlier torch/scikit-learn model of the job, preferring the export's source."""
    source = onnx_model.meta.get("source_framework")
    wanted = (source,) if source in NATIVE_FRAMEWORKS else NATIVE_FRAMEWORKS
    if ctx.load_model is not None:
        for record in reversed(ctx.history):
            # A step's output, else its input: a job may start from an uploaded model.
            for side in ("output", "input"):
                key = record.get(f"{side}_key")
                if key and record.get(f"{side}_framework") in wanted:
                    return ctx.load_model(key), {**record, "side": side}
    raise IncompatibleError(
        f"onnx_parity needs an earlier {' or '.join(wanted)} model in this job to compare the "
        "ONNX model against; put onnx_parity after onnx_export in a job that has one (or, for "
        "a bring-your-own ONNX model, after a step that changed it, like onnx_quantize)"
    )


def _earlier_onnx(ctx: StepContext) -> tuple[ModelArtifact, dict[str, Any]] | None:
    """The newest earlier ONNX model of the job other than the step's own input."""
    if ctx.load_model is None or not ctx.history:
        return None
    current = ctx.history[-1].get("output_key")
    for record in reversed(ctx.history):
        for side in ("output", "input"):
            key = record.get(f"{side}_key")
            if key and key != current and record.get(f"{side}_framework") == "onnx":
                return ctx.load_model(key), {**record, "side": side}
    return None


def find_reference_model(
    onnx_model: ModelArtifact, ctx: StepContext
) -> tuple[ModelArtifact, dict[str, Any]]:
    """The native model the graph came from, else the earlier ONNX model it was made from."""
    try:
        return find_native_model(onnx_model, ctx)
    except IncompatibleError:
        found = _earlier_onnx(ctx)
        if found is None:
            raise
        return found


def evaluation_feeds(
    proto: Any, data: Dataset, *, inputs_id: str | None, ctx: StepContext, split: str = "test"
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The graph's feeds from the user's inputs file, else from a dataset split; and whence."""
    specs = onnx_inputs(proto)
    if inputs_id is not None:
        if ctx.read_bytes is None:
            raise BadInputError("this runner cannot read stored inputs files")
        arrays = load_stored_inputs(ctx.read_bytes, user_id=ctx.user_id, inputs_id=inputs_id)
        feeds = prepare_feeds(specs, arrays, source=f"inputs file {inputs_id}")
        return feeds, {"inputs": inputs_id, "rows": n_rows(feeds)}
    x = data.X_test if split == "test" else data.X_train
    feeds = dataset_feeds(specs, x, dataset=data.name)
    return feeds, {"dataset": data.name, "split": split, "rows": n_rows(feeds)}


def native_outputs(native: ModelArtifact, kind: str) -> Callable[[np.ndarray], np.ndarray]:
    """The native model's raw output: logits or probabilities for labels, values otherwise."""
    if native.framework == "torch":
        import torch

        from modules.training.finetune import eval_mode, forward

        module = eval_mode(native.obj)

        def run(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return forward(module, x).numpy()

        return run
    estimator = native.obj
    if kind == "labels" and hasattr(estimator, "predict_proba"):
        return estimator.predict_proba
    return lambda x: np.asarray(estimator.predict(x), dtype=np.float64).reshape(len(x), -1)


def _initializer_bytes(proto: Any) -> int:
    from onnx import helper

    total = 0
    for tensor in proto.graph.initializer:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
        total += int(np.prod(tensor.dims, dtype=np.int64)) * itemsize
    return total


def auto_batch(proto: Any, feeds: Mapping[str, np.ndarray], ctx: StepContext) -> dict[str, Any]:
    """The job's auto-batch: an earlier hardware_sim step's, else estimated for the profile.

    The estimate follows hardware_sim's rule (the largest power of two whose predicted
    memory fits the profile's budget) on the ONNX memory model: initializers + input and
    output tensors, measured at MEMORY_PROBE_BATCHES rows.
    """
    from modules.evaluation.hardware_sim import MIB, fit_memory_curve, pick_batch

    for record in reversed(ctx.history):
        found = (record.get("metrics") or {}).get("auto_batch")
        if record.get("step") in ("hardware_sim", "budget_gate") and isinstance(found, int):
            return {"auto_batch": found, "from": f"step {record.get('index')} ({record['step']})"}
    runner = OrtRunner.of(proto, threads=1)
    model_bytes = _initializer_bytes(proto)
    measured = {}
    for size in MEMORY_PROBE_BATCHES:
        batch = feed_batch(feeds, size)
        outputs = runner.run(batch)
        io_bytes = sum(a.nbytes for a in batch.values()) + sum(a.nbytes for a in outputs.values())
        measured[size] = model_bytes + int(io_bytes)
    curve = fit_memory_curve(measured, model_bytes=model_bytes, method="initializers + I/O")
    budget = ctx.profile.memory_budget_mb * MIB
    return {
        "auto_batch": pick_batch(curve, budget),
        "from": (
            f"estimated for profile {ctx.profile.name} ({ctx.profile.memory_budget_mb:g} MB): "
            "initializers + input/output tensors"
        ),
    }


def deploy_batch_sizes(
    proto: Any,
    feeds: Mapping[str, np.ndarray],
    *,
    wanted: tuple[int, ...] | None,
    ctx: StepContext,
) -> tuple[list[int], dict[str, Any]]:
    """The batch sizes outputs are compared at, and how they were chosen (for the report)."""
    rows = n_rows(feeds)
    info: dict[str, Any] = {"rows": rows}
    # As OrtRunner reads it, without starting a session for it.
    dims = [s.shape[0] for s in onnx_inputs(proto) if s.shape and isinstance(s.shape[0], int)]
    fixed = min((d for d in dims if d > 0), default=None)
    if fixed:
        return [fixed], {**info, "from": f"the graph's fixed batch dimension ({fixed})"}
    if wanted is not None:
        sizes = list(wanted)
        info["from"] = "the step's batch_sizes"
    else:
        found = auto_batch(proto, feeds, ctx)
        sizes = sorted({1} | ({found["auto_batch"]} if found["auto_batch"] else set()))
        info["from"] = "1 and the profile's auto-batch"
        info.update(auto_batch=found["auto_batch"], auto_batch_from=found["from"])
        if found["auto_batch"] is None:
            info["note"] = "batch 1 does not fit the profile's memory budget; checked at 1 only"
    capped = sorted({min(b, rows) for b in sizes})
    if capped != sorted(sizes):
        info["capped"] = f"sizes above the {rows} rows available are checked at {rows}"
    return capped, info


def compare_at_batches(
    reference: Mapping[str, np.ndarray],
    run: Callable[[int], Mapping[str, np.ndarray]],
    *,
    sizes: list[int],
    kind: str,
    thresholds: GateThresholds,
    worst: int = 10,
    mismatch_sample: int = 20,
) -> tuple[dict[str, Any], Verdict]:
    """Compare `run(batch)` with the reference at each batch size; the worst one leads.

    Returns the worst size's result (with `batch_size`, `batch_sizes` and `by_batch_size`,
    one summary per size) and the verdict of the worst size.
    """
    results: dict[int, dict[str, Any]] = {}
    verdicts: dict[int, Verdict] = {}
    for size in sizes:
        results[size] = compare_outputs(
            reference, run(size), kind=kind, worst=worst, mismatch_sample=mismatch_sample
        )
        verdicts[size] = output_verdict(results[size], thresholds)
    lead = worst_batch(results, verdicts)
    by_batch = {
        f"b{size}": {
            **{k: v for k, v in r.items() if k not in ("outputs", "worst_rows", "kind")},
            "passed": verdicts[size].passed,
            "reason": verdicts[size].reason,
        }
        for size, r in results.items()
    }
    result = {**results[lead], "batch_size": lead, "batch_sizes": sizes, "by_batch_size": by_batch}
    return result, batch_verdict(verdicts, lead)


def check_output_parity(
    reference: ModelArtifact,
    candidate: ModelArtifact,
    feeds: dict[str, np.ndarray],
    params: ParityParams,
    *,
    sizes: list[int] | None = None,
) -> tuple[dict[str, Any], Verdict]:
    """Compare the candidate graph's outputs with the reference's on the feeds, by kind.

    The candidate runs `sizes` rows per call (each checked, the worst decides; default 1);
    the reference runs once, in its default chunks.
    """
    runner = OrtRunner.of(candidate.obj, threads=params.threads)
    reference_fn: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]
    if reference.framework == "onnx":
        reference_fn = OrtRunner.of(reference.obj, threads=params.threads).run
    else:
        if len(feeds) != 1 and reference.framework != "torch":
            raise IncompatibleError(
                f"the native {reference.framework} model takes one feature array; the graph "
                f"takes {len(feeds)} inputs"
            )
        # The native model's one output is compared with the graph's first float output.
        name = next((s.name for s in runner.outputs if s.dtype and "float" in s.dtype), None)
        name = name or runner.outputs[0].name
        native_fn = native_outputs(
            reference, params.output_kind if params.output_kind != "auto" else "labels"
        )

        def reference_fn(f: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            # Several inputs reach a torch model positionally, in the graph's input order.
            x = as_named_inputs(f) if len(f) > 1 else next(iter(f.values()))
            return {name: np.asarray(native_fn(x))}

    ref_out = reference_fn(feeds)
    kind, why = resolve_kind(params.output_kind, candidate.meta, ref_out)
    result, verdict = compare_at_batches(
        ref_out,
        lambda size: runner.run(feeds, chunk=size),
        sizes=sizes or [1],
        kind=kind,
        thresholds=params,
        worst=params.worst_rows,
        mismatch_sample=params.mismatch_sample,
    )
    sizes = runner.batch_sizes(params.latency_batch)
    native = reference.framework in NATIVE_FRAMEWORKS
    limit = native_threads(reference.framework, params.threads)
    with limit if native else contextlib.nullcontext():
        ref_ms = time_feeds(
            reference_fn,
            feeds,
            sizes=sizes,
            warmup=params.warmup,
            runs=params.runs,
            threads=params.threads,
            ci_target=params.ci_target,
            max_time_s=params.max_time_s,
        )
    ort_ms = time_feeds(
        runner.run,
        feeds,
        sizes=sizes,
        warmup=params.warmup,
        runs=params.runs,
        threads=params.threads,
        ci_target=params.ci_target,
        max_time_s=params.max_time_s,
    )
    report = {
        **result,
        "kind_reason": why,
        "passed": verdict.passed,
        "reason": verdict.reason,
        "thresholds": thresholds_of(kind, params),
        "latency_ms": {"reference": ref_ms, "onnxruntime": ort_ms},
        **speedups(ref_ms, ort_ms),
        "opset": _opsets(candidate.obj),
        "onnx": {
            "source_framework": candidate.meta.get("source_framework"),
            "quantized": candidate.meta.get("quantized"),
            "size_bytes": candidate.obj.ByteSize(),
            "inputs": [s.as_dict() for s in runner.inputs],
        },
        "reference": {"framework": reference.framework},
    }
    if reference.framework == "onnx":
        report["reference"]["size_bytes"] = reference.obj.ByteSize()
    return report, verdict


def _latency(scores: Any, x: np.ndarray, params: ParityParams) -> dict[str, Any]:
    out = {}
    for size in sorted({1, params.latency_batch}):
        stat, _ = time_batches(
            scores,
            batch_of(x, size),
            warmup=params.warmup,
            runs=params.runs,
            ci_target=params.ci_target,
            max_time_s=params.max_time_s,
        )
        out[f"b{size}"] = stat | {"batch_size": size, "threads": params.threads or "default"}
    return out


@contextlib.contextmanager
def native_threads(framework: str, threads: int | None) -> Iterator[None]:
    """Limit torch's intra-op pool or scikit-learn's OpenMP/BLAS pools for a while."""
    if threads is None:
        yield
    elif framework == "torch":
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)
    else:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(threads):
            yield


def ort_scores(onnx_model: ModelArtifact, threads: int | None) -> Any:
    """A scoring function on an ONNX Runtime session with the given intra-op threads."""
    return OrtRunner.of(onnx_model.obj, threads=threads).run_matrix


def _opsets(proto: Any) -> dict[str, int]:
    return {(o.domain or "ai.onnx"): int(o.version) for o in proto.opset_import}


def check_parity(
    native: ModelArtifact,
    onnx_model: ModelArtifact,
    data: Dataset,
    params: ParityParams,
    *,
    sizes: list[int] | None = None,
) -> tuple[dict[str, Any], Verdict]:
    """Predict the test split with both, time both; returns (report, verdict).

    ONNX Runtime predicts `sizes` rows per call (each checked, the worst decides; default
    the whole split at once).
    """
    data = dataset_for_model(data, model_input_specs(native))
    x = data.X_test
    native_pred = make_predictor(native)
    native_pred.check_features(x)
    native_scores = np.asarray(native_pred.scores(x))
    # The native model is timed before ONNX Runtime first runs: ORT's worker threads keep
    # spinning after a run, and on a small machine they would steal the cores torch's or
    # scikit-learn's threads are timed on.
    with native_threads(native.framework, params.threads):
        native_ms = _latency(native_pred.scores, x, params)
    onnx_pred = make_predictor(onnx_model)
    onnx_pred.check_features(x)
    compare_probs = native.framework == "torch" or hasattr(native.obj, "predict_proba")
    results: dict[int, dict[str, Any]] = {}
    verdicts: dict[int, Verdict] = {}
    for size in sizes or [len(x)]:
        onnx_scores = np.concatenate(
            [np.asarray(onnx_pred.scores(x[i : i + size])) for i in range(0, len(x), size)]
        )
        result = compare_predictions(
            native_scores,
            onnx_scores,
            mismatch_sample=params.mismatch_sample,
            compare_probs=compare_probs,
        )
        result["kind"] = "labels"
        result["worst_rows"] = label_worst_rows(native_scores, onnx_scores, worst=params.worst_rows)
        results[size], verdicts[size] = result, parity_verdict(result, params)
    lead = worst_batch(results, verdicts)
    verdict = batch_verdict(verdicts, lead)
    result = {k: v for k, v in results[lead].items() if k != "kind"}
    result["batch_size"], result["batch_sizes"] = lead, sorted(results)
    result["by_batch_size"] = {
        f"b{size}": {k: r[k] for k in ("agreement", "max_abs_prob_diff", "n_mismatched") if k in r}
        | {"passed": verdicts[size].passed, "reason": verdicts[size].reason}
        for size, r in results.items()
    }
    # The predictor scores with the graph's first float output; name it for the report.
    floats = [o.name for o in onnx_outputs(onnx_model.obj) if o.dtype and "float" in o.dtype]
    result["worst_output"] = floats[0] if floats else None
    ort_ms = _latency(ort_scores(onnx_model, params.threads), x, params)
    report = {
        **result,
        "passed": verdict.passed,
        "reason": verdict.reason,
        "thresholds": {
            "min_agreement": params.min_agreement,
            "max_prob_diff": params.max_prob_diff,
        },
        "latency_ms": {"native": native_ms, "onnxruntime": ort_ms},
        **speedups(native_ms, ort_ms),
        "opset": _opsets(onnx_model.obj),
        "onnx": {
            "source_framework": onnx_model.meta.get("source_framework"),
            "precision": onnx_model.meta.get("precision"),
            "quantized": onnx_model.meta.get("quantized"),
            "size_bytes": onnx_model.obj.ByteSize(),
        },
        "native": {"framework": native.framework},
        "dataset": data.describe(),
    }
    return report, verdict


GENERIC_HEADLINE = (
    "kind",
    "kind_reason",
    "n_samples",
    "batch_size",
    "batch_sizes",
    "by_batch_size",
    "agreement",
    "max_abs_prob_diff",
    "min_cosine",
    "mean_cosine",
    "r2",
    "max_rel_error",
    "max_abs_error",
    "worst_output",
    "latency_ms",
    "speedup_median",
    "speedup_median_note",
    "opset",
)


@register_step("onnx_parity", params=ParityParams, accepts={"onnx"}, gate=True)
def onnx_parity(
    model: ModelArtifact, data: Dataset, params: ParityParams, ctx: StepContext
) -> StepOutput:
    """Gate: ONNX Runtime must agree with the native model, or a BYO graph with its original."""
    from modules.core.versions import library_versions

    reference, record = find_reference_model(model, ctx)
    side = record["side"]
    origin = {
        "step": record.get("step"),
        "key": record.get(f"{side}_key"),
        "as": f"{side} of the step",
    }
    by_labels = params.inputs is None and params.output_kind in ("auto", "labels")
    feeds, source = evaluation_feeds(model.obj, data, inputs_id=params.inputs, ctx=ctx)
    sizes, batching = deploy_batch_sizes(model.obj, feeds, wanted=params.batch_sizes, ctx=ctx)
    if reference.framework == "onnx" or not by_labels:
        report, verdict = check_output_parity(reference, model, feeds, params, sizes=sizes)
        report["reference"].update(origin)
        report["inputs"] = source
        report["batching"] = batching
        report["versions"] = library_versions()
        headline = [k for k in GENERIC_HEADLINE if k in report]
        metrics = {k: report[k] for k in headline}
        metrics["worst_rows"] = report["worst_rows"][:5]
        files = {"deployment_report.json": json.dumps(report, indent=2, default=str).encode()}
        return StepOutput(model=None, metrics=metrics, files=files, verdict=verdict)
    report, verdict = check_parity(reference, model, data, params, sizes=sizes)
    report["native"].update(origin)
    report["batching"] = batching
    report["versions"] = library_versions()
    metrics = {
        k: report[k]
        for k in (
            "batch_size",
            "batch_sizes",
            "by_batch_size",
            "agreement",
            "max_abs_prob_diff",
            "n_samples",
            "n_mismatched",
            "mismatched_indices_sample",
            "latency_ms",
            "speedup_median",
            "speedup_median_note",
            "opset",
        )
        if k in report
    }
    files = {"deployment_report.json": json.dumps(report, indent=2, default=str).encode()}
    return StepOutput(model=None, metrics=metrics, files=files, verdict=verdict)


def _stage_inputs(workspace: Any, path: Any, trust_pickle: bool) -> str:
    from modules.storage.inputs import stage_inputs_file

    return stage_inputs_file(workspace, path)


def main(argv: list[str] | None = None) -> int:
    """Export a native model file to ONNX and gate it: 0 passed, 1 rejected, 2 bad input.

    The gate needs the model the ONNX graph came from, so this runs the two-step job
    onnx_export -> onnx_parity through the in-process runner (and so through run_step).
    """
    import sys
    import tempfile
    from pathlib import Path

    from modules.core.jobspec import parse_job_spec
    from modules.deployment.onnx_export import OnnxExportParams
    from modules.errors import McaasError
    from modules.pipeline.local import LocalWorkspace, write_atomic
    from modules.pipeline.script import FileOption, ScriptOptions, add_params_options, base_parser

    parser = base_parser("Export a model to ONNX and check ONNX Runtime parity on the test split.")
    inputs = FileOption("--inputs", _stage_inputs, ".npz with one array per graph input.")
    read_gate = add_params_options(parser, ParityParams, ScriptOptions(files={"inputs": inputs}))
    read_export = add_params_options(parser, OnnxExportParams, only=["opset"])
    args = parser.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="mcaas-parity-") as tmp:
            ws = LocalWorkspace(Path(tmp))
            key = ws.import_model(args.input_model, user_id="local", trust_pickle=args.trust_pickle)
            spec = parse_job_spec(
                {
                    "model": key,
                    "dataset": args.dataset,
                    "profile": args.profile,
                    "seed": args.seed,
                    "steps": [
                        {"name": "onnx_export", "params": read_export(args, ws.root)},
                        {"name": "onnx_parity", "params": read_gate(args, ws.root)},
                    ],
                }
            )
            result = ws.run(spec, trust_pickle=args.trust_pickle)
            last = result.records[-1] if result.records else None
            if result.status == "COMPLETED" and args.output_model is not None:
                assert last is not None and last.output_key  # a completed export stored it
                if args.output_model.suffix != ".onnx":
                    raise IncompatibleError(f"output {args.output_model.name}: use *.onnx")
                write_atomic(args.output_model, ws.store.get_bytes(last.output_key))
    except McaasError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    line = {
        "step": "onnx_parity",
        "status": result.status.value,
        "reason": result.reason,
        "output_model": str(args.output_model) if result.status == "COMPLETED" else None,
        "verdict": last.verdict if last is not None else None,
        "metrics": last.metrics if last is not None else None,
    }
    print(json.dumps(line, default=str))
    return 0 if result.status == "COMPLETED" else 1


if __name__ == "__main__":
    raise SystemExit(main())
