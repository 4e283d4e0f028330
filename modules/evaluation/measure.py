"""The `measure` step: size, parameters, accuracy, latency with CI, throughput, memory.

Latency: `warmup` untimed runs, then at least `runs` timed runs of one batch each, and
more in rounds until the 95% CI of the median is within `ci_target` of the median, or
`max_time_s` of timing or MAX_SAMPLES samples are spent; a latency that stopped short of
the target is flagged `noisy`. Reported as median (order-statistic CI), mean, std and a
Student-t 95% CI in milliseconds, with the batch size and the thread count.
Memory: torch = parameter bytes + the activations its leaf modules emit for one batch
(forward hooks); scikit-learn = model arrays + peak Python/numpy allocations during
predict (tracemalloc); ONNX = initializer bytes + input and output tensors. Each result
names its method.
"""

from __future__ import annotations

import time
import tracemalloc
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from modules.core.artifact import ModelArtifact
from modules.core.registry import register_step
from modules.core.step import StepContext, StepOutput
from modules.errors import BadInputError
from modules.evaluation.inference import Predictor, make_predictor
from modules.evaluation.stats import median_interval, summarize
from modules.storage.datasets import Dataset
from modules.storage.inputs import (
    as_named_inputs,
    dataset_for_model,
    load_stored_inputs,
    model_input_specs,
    onnx_inputs,
    prepare_feeds,
    torch_input_specs,
)
from modules.storage.keys import check_inputs_id
from modules.storage.model_formats import save_model

DEFAULT_CI_TARGET = 0.05
DEFAULT_MAX_TIME_S = 1.0
# With the time cap, bounds a tiny model's timing: 5000 runs of 50 us are 0.25 s.
MAX_SAMPLES = 5000
# Below 6 samples the median's interval is (min, max), which covers it less than 95% of
# the time, so no smaller count meets a target.
MIN_CI_SAMPLES = 6
# The largest batch a step may time: techniques time their whole test split as one batch,
# so this is far above a real split, yet refuses a batch that could never be allocated.
MAX_BATCH_ROWS = 1_048_576


class TimingFields(BaseModel):
    """The timing params of every step that times latency (defined once, here)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    warmup: int = Field(default=3, ge=0, le=1000, description="Untimed runs before timing.")
    runs: int = Field(
        default=20,
        ge=2,
        le=10_000,
        description="Minimum timed runs per batch size; more follow until ci_target is met.",
    )
    ci_target: float = Field(
        default=DEFAULT_CI_TARGET,
        ge=0.005,
        le=0.5,
        description=(
            "Keep timing until the 95% CI half-width of the median latency is within this "
            "fraction of the median (else the latency is flagged noisy)."
        ),
    )
    max_time_s: float = Field(
        default=DEFAULT_MAX_TIME_S,
        gt=0,
        le=60,
        description=(
            "Most seconds of timing per model and batch size once the minimum runs are done."
        ),
    )


class MeasureParams(TimingFields):
    """Params of the `measure` step."""

    batch_sizes: list[Annotated[int, Field(ge=1, le=MAX_BATCH_ROWS)]] = Field(
        default=[1, 64],
        min_length=1,
        max_length=8,
        description="Batch sizes to time (each 1 to 1048576 rows: steps time their whole "
        "test split as one batch).",
    )
    inputs: str | None = Field(
        default=None,
        max_length=64,
        description=(
            "Id of an inputs file (POST /v1/inputs): one array per model input, for models "
            "the dataset cannot feed (latency, size and memory only: it holds no labels); "
            "none = the dataset's test split."
        ),
    )

    @field_validator("inputs")
    @classmethod
    def _id_shape(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return check_inputs_id(value)
        except BadInputError as exc:
            raise ValueError(str(exc)) from None


def time_batches(
    fn: Any,
    x: np.ndarray,
    *,
    warmup: int,
    runs: int,
    ci_target: float = DEFAULT_CI_TARGET,
    max_time_s: float = DEFAULT_MAX_TIME_S,
    max_samples: int = MAX_SAMPLES,
) -> tuple[dict[str, Any], list[float]]:
    """Time `fn(x)` until the median's 95% CI is tight; the summary in ms and the raw samples.

    After `warmup` untimed calls, `runs` timed calls always run; then rounds of more calls
    until the CI half-width of the median is within `ci_target` (a fraction of the median)
    with at least MIN_CI_SAMPLES samples, or `max_time_s` of timing or `max_samples`
    samples are spent; a timing that missed the target is `noisy`. max_time_s=0 times
    exactly `runs` calls (interleaved benchmarks that need equal counts).
    """
    for _ in range(warmup):
        fn(x)
    cap = max(runs, max_samples)
    samples: list[float] = []
    began = time.perf_counter()

    def take(count: int) -> None:
        for _ in range(count):
            start = time.perf_counter()
            fn(x)
            end = time.perf_counter()
            samples.append((end - start) * 1000.0)
            if len(samples) >= runs and end - began >= max_time_s:
                return

    take(runs)
    while True:
        half_rel = _median_half_width_rel(samples)
        met = len(samples) >= MIN_CI_SAMPLES and half_rel <= ci_target
        spent = time.perf_counter() - began
        if met or spent >= max_time_s or len(samples) >= cap:
            break
        # Rounds grow with n, so the interval is recomputed O(log n) times.
        take(min(max(runs, MIN_CI_SAMPLES, len(samples) // 2), cap - len(samples)))
    stopped_by = "ci_target" if met else "max_samples" if len(samples) >= cap else "max_time_s"
    stat = summarize(samples, unit="ms") | {
        "ci_target": ci_target,
        "ci_half_width_rel": half_rel,
        "target_met": met,
        "noisy": not met,
        "stopped_by": stopped_by,
        "timing_s": spent,
    }
    return stat, samples


def _median_half_width_rel(samples: list[float]) -> float:
    """Half the width of the median's 95% CI as a fraction of the median."""
    lo, hi = median_interval(samples)
    median = float(np.median(samples))
    if median > 0:
        return (hi - lo) / 2 / median
    # A median the clock cannot resolve is no measurement unless every sample agrees.
    return 0.0 if hi == lo else float("inf")


def batch_of(x: np.ndarray, size: int) -> np.ndarray:
    """`size` rows of x, cycling when x is shorter."""
    reps = -(-size // len(x))
    return np.ascontiguousarray(np.concatenate([x] * reps)[:size]) if reps > 1 else x[:size]


def count_params(artifact: ModelArtifact) -> tuple[int, int]:
    """(parameters, non-zero parameters): weights for torch/ONNX, stored numbers for sklearn."""
    arrays = list(_weight_arrays(artifact))
    total = sum(int(a.size) for a in arrays)
    nonzero = sum(int(np.count_nonzero(a)) for a in arrays)
    return total, nonzero


def _weight_arrays(artifact: ModelArtifact) -> Any:
    if artifact.framework == "torch":
        for t in artifact.obj.state_dict().values():
            if t.is_floating_point() or t.dtype.is_signed:
                yield t.detach().cpu().numpy()
            # packed quantized weights have no numpy view; count_params stays a float count
    elif artifact.framework == "onnx":
        from onnx import numpy_helper

        for init in artifact.obj.graph.initializer:
            yield numpy_helper.to_array(init)
    else:
        yield from _sklearn_arrays(artifact.obj, seen=set())


def _sklearn_arrays(obj: Any, *, seen: set[int]) -> Any:
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, np.ndarray) and obj.dtype.kind in "biuf":
        yield obj
    elif isinstance(obj, list | tuple):
        for item in obj:
            yield from _sklearn_arrays(item, seen=seen)
    elif hasattr(obj, "__getstate__") and type(obj).__module__.startswith("sklearn"):
        state = obj.__getstate__()
        if isinstance(state, dict):
            for key, value in state.items():
                # Fitted arrays in private attributes count too: KNN keeps its stored
                # samples in _fit_X and _y, its KD/ball tree in _tree.
                fitted = key.endswith("_") or isinstance(value, np.ndarray)
                if fitted or key in {"tree_", "estimators_", "steps", "_tree"}:
                    yield from _sklearn_arrays(value, seen=seen)
            nodes = state.get("nodes")
            if isinstance(nodes, np.ndarray):  # sklearn.tree._tree.Tree
                yield from (nodes[f] for f in ("threshold", "feature", "left_child"))
                yield state["values"]
        elif isinstance(state, tuple):  # KDTree / BallTree pickle their arrays as a tuple
            yield from _sklearn_arrays(list(state), seen=seen)
        for name in ("steps",):
            for _, step in getattr(obj, name, []) or []:
                yield from _sklearn_arrays(step, seen=seen)


def inference_memory(artifact: ModelArtifact, x: np.ndarray) -> dict[str, Any]:
    """Bytes needed to run one batch `x`, with the method that produced the number."""
    if artifact.framework == "torch":
        import torch

        from modules.training.finetune import forward

        module = artifact.obj
        param_bytes = sum(t.numel() * t.element_size() for t in module.state_dict().values())
        act_bytes = 0

        def hook(_m: Any, _i: Any, out: Any) -> None:
            nonlocal act_bytes
            if isinstance(out, torch.Tensor):
                act_bytes += out.numel() * out.element_size()

        leaves = [m for m in module.modules() if not list(m.children())]
        handles = [m.register_forward_hook(hook) for m in leaves]
        try:
            with torch.inference_mode():
                forward(module, x)
        finally:
            for h in handles:
                h.remove()
        return {
            "bytes": int(param_bytes + act_bytes + x.nbytes),
            "model_bytes": int(param_bytes),
            "activation_bytes": int(act_bytes),
            "method": "parameters + leaf-module activations (forward hooks)",
        }
    if artifact.framework == "sklearn":
        model_bytes = sum(int(a.nbytes) for a in _sklearn_arrays(artifact.obj, seen=set()))
        predictor = make_predictor(artifact)
        tracemalloc.start()
        try:
            predictor.scores(x)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        return {
            "bytes": int(model_bytes + peak),
            "model_bytes": int(model_bytes),
            "activation_bytes": int(peak),
            "method": "model arrays + tracemalloc peak during predict",
        }
    model_bytes = sum(int(a.nbytes) for a in _weight_arrays(artifact))
    out = make_predictor(artifact).scores(x)
    io_bytes = int(x.nbytes + np.asarray(out).nbytes)
    return {
        "bytes": model_bytes + io_bytes,
        "model_bytes": model_bytes,
        "activation_bytes": io_bytes,
        "method": "initializers + input/output tensors (ONNX Runtime arena not visible)",
    }


def thread_count(framework: str) -> int:
    """Threads a framework computes on: torch's intra-op pool, else the CPUs this may use."""
    if framework == "torch":
        import torch

        return int(torch.get_num_threads())
    import os

    return len(os.sched_getaffinity(0))


def timing_environment(framework: str) -> dict[str, Any]:
    """Threads used for timing, and whether other processes of this worker share the cores.

    A worker exports its pool size and CPU count (MCAAS_WORKER_CONCURRENCY,
    MCAAS_WORKER_CPUS). Several pool processes timing on fewer cores than they use between
    them time each other's work: such a latency is recorded with a warning.
    """
    import os

    threads = thread_count(framework)
    cpus = _env_int("MCAAS_WORKER_CPUS") or len(os.sched_getaffinity(0))
    concurrency = _env_int("MCAAS_WORKER_CONCURRENCY")
    out: dict[str, Any] = {"threads": threads, "cpus": cpus, "worker_concurrency": concurrency}
    if concurrency is not None and concurrency > 1 and concurrency * threads > cpus:
        out["warning"] = (
            f"{concurrency} worker pool processes x {threads} threads on {cpus} CPUs: "
            "concurrent jobs share these cores, so latencies are not comparable; run timing "
            "workers with --concurrency=1 (see docs/service.md)"
        )
    return out


def _env_int(name: str) -> int | None:
    import os

    value = os.environ.get(name, "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def measure_model(
    artifact: ModelArtifact,
    data: Dataset,
    params: MeasureParams,
    *,
    predictor: Predictor | None = None,
    feeds: np.ndarray | None = None,
) -> dict[str, Any]:
    """All measurements of one model on the test split (or on `feeds`, with no accuracy).

    feeds: the model's inputs, one row per sample, as one array or a structured array
        with a field per named input (an inputs file's arrays); None = the test split,
        shaped for the model's inputs.
    """
    predictor = predictor or make_predictor(artifact)
    if feeds is None:
        data = dataset_for_model(data, model_input_specs(artifact))
        x_test = data.X_test
        predictor.check_features(x_test)
    else:
        x_test = feeds
    blob = save_model(artifact)
    n_params, n_nonzero = count_params(artifact)
    scored: dict[str, Any] = (
        {
            "accuracy": float((predictor.labels(x_test) == data.y_test).mean()),
            "n_test": len(data.y_test),
        }
        if feeds is None
        else {"accuracy": None, "n_inputs_rows": len(x_test)}
    )
    metrics: dict[str, Any] = {
        "framework": artifact.framework,
        "size_bytes": len(blob),
        "params": n_params,
        "nonzero_params": n_nonzero,
        "sparsity": (1 - n_nonzero / n_params) if n_params else 0.0,
        **scored,
        "threads": thread_count(artifact.framework),
        "timing_environment": timing_environment(artifact.framework),
        "latency_ms": {},
        "throughput_per_s": {},
        "memory": {},
    }
    for size in params.batch_sizes:
        x = batch_of(x_test, size)
        stat, _ = time_batches(
            predictor.scores,
            x,
            warmup=params.warmup,
            runs=params.runs,
            ci_target=params.ci_target,
            max_time_s=params.max_time_s,
        )
        stat["batch_size"] = size
        stat["threads"] = metrics["threads"]
        metrics["latency_ms"][f"b{size}"] = stat
        metrics["throughput_per_s"][f"b{size}"] = size / (stat["median"] / 1000.0)
        metrics["memory"][f"b{size}"] = inference_memory(artifact, x)
    return metrics


@register_step("measure", params=MeasureParams, accepts={"torch", "sklearn", "onnx"})
def measure(
    model: ModelArtifact, data: Dataset, params: MeasureParams, ctx: StepContext
) -> StepOutput:
    """Measure size, parameters, accuracy, latency (median and 95% CI), throughput, memory."""
    feeds = None if params.inputs is None else stored_feeds(model, params.inputs, ctx)
    metrics = measure_model(model, data, params, feeds=feeds)
    if feeds is not None:
        metrics["inputs"] = params.inputs
    if ctx.repeats > 1:
        metrics.update(repeated_measurements(model, data, params, ctx))
    return StepOutput(model=None, metrics=metrics)


def stored_feeds(model: ModelArtifact, inputs_id: str, ctx: StepContext) -> np.ndarray:
    """The user's inputs file checked against the model's inputs, as one (structured) array."""
    if ctx.read_bytes is None:
        raise BadInputError("this runner cannot read stored inputs files")
    specs = onnx_inputs(model.obj) if model.framework == "onnx" else None
    if model.framework == "torch":
        specs = torch_input_specs(model.meta)
    if not specs:
        raise BadInputError(
            f"measure: the {model.framework} model declares no named inputs to match an "
            "inputs file against; measure it on a dataset"
        )
    arrays = load_stored_inputs(ctx.read_bytes, user_id=ctx.user_id, inputs_id=inputs_id)
    feeds = prepare_feeds(specs, arrays, source=f"inputs file {inputs_id}")
    return as_named_inputs(feeds) if len(feeds) > 1 else next(iter(feeds.values()))


def repeated_measurements(
    model: ModelArtifact, data: Dataset, params: MeasureParams, ctx: StepContext
) -> dict[str, Any]:
    """Repeat the whole measuring protocol ctx.repeats times on the seed schedule.

    Each repeat contributes its latency medians, throughput, accuracy, size and the
    profile's energy estimate (power x batch-1 median / compute scale); each of these gets
    mean, std, 95% CI and n. Measuring uses no randomness: the seeds are recorded so a
    repeat of a step that does (sweep, auto) lines up with this one.
    """
    from modules.evaluation.repeat import repeat_runs

    profile = ctx.profile
    feeds = None if params.inputs is None else stored_feeds(model, params.inputs, ctx)

    def one(_seed: int) -> dict[str, Any]:
        again = measure_model(model, data, params, feeds=feeds)
        b1 = again["latency_ms"].get("b1")
        energy = (
            {"energy_mj_estimate": profile.power_w * b1["median"] / profile.compute_scale}
            if b1
            else {}
        )
        return {
            "latency_ms": {k: v["median"] for k, v in again["latency_ms"].items()},
            "throughput_per_s": again["throughput_per_s"],
            **({"accuracy": again["accuracy"]} if again["accuracy"] is not None else {}),
            "size_bytes": again["size_bytes"],
            **energy,
        }

    repeated = repeat_runs(one, ctx.repeats, ctx.seed)
    summaries = repeated["metrics"]
    return {
        # The per-repeat medians get their own CI (kept under the name earlier runs used).
        "latency_median_over_repeats_ms": {
            key.removeprefix("latency_ms."): stat | {"unit": "ms"}
            for key, stat in summaries.items()
            if key.startswith("latency_ms.")
        },
        "repeats": {"n": repeated["n"], "seeds": repeated["seeds"], "metrics": summaries},
    }
