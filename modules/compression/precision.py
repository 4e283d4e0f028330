"""Precision pathways for scikit-learn models: float32, float16 and int8-simulated.

* float32 / float16: the stored numbers (KNN training points, tree thresholds, linear
  coef_) are rounded to that type; inputs stay float32 (storage in the low precision,
  compute in float32, as on CPUs that widen on load).
* int8: every input feature gets a per-feature affine grid of 256 levels over its range
  on the train split (quantize = bin index, dequantize = bin centre). KNN and linear
  models become Pipeline(KBinsDiscretizer, StandardScaler-as-dequantizer, model) with the
  stored points / weights on the grid (weights: per-class symmetric int8); trees need no
  extra step: each threshold moves to the bin edge that makes "x <= t" on raw inputs
  decide exactly as the quantized input would.
The result stays made of stock scikit-learn objects, so skops loads it and skl2onnx
exports it. Metrics: accuracy, label agreement with the float32 pathway, and the bytes
the reduced-precision arrays would take.

CLI: python -m modules.compression.precision --input-model m.skops --output-model q.skops
     --dtype int8
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from modules.compression.forest_prune import tree_with_thresholds
from modules.core.artifact import ModelArtifact
from modules.core.registry import register_step
from modules.core.step import StepContext, StepOutput
from modules.errors import IncompatibleError
from modules.evaluation.inference import make_predictor
from modules.evaluation.measure import MeasureParams, measure_model
from modules.storage.datasets import Dataset

Dtype = Literal["float32", "float16", "int8"]
DTYPES: tuple[Dtype, ...] = ("float32", "float16", "int8")
INT8_LEVELS = 256
_ITEMSIZE = {"float32": 4, "float16": 2, "int8": 1}
# Thresholds that send every finite float32 input one way.
_ALWAYS_LEFT = float(np.finfo(np.float32).max)
_ALWAYS_RIGHT = -_ALWAYS_LEFT


# --- pure functions ------------------------------------------------------------------------------


def agreement(reference: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of positions where two label arrays agree."""
    reference, labels = np.asarray(reference), np.asarray(labels)
    if reference.shape != labels.shape or reference.size == 0:
        raise ValueError(f"cannot compare labels of shapes {reference.shape} and {labels.shape}")
    return float(np.mean(reference == labels))


def input_quantizer(x_calib: np.ndarray) -> list[tuple[str, Any]]:
    """Pipeline steps that quantize each feature to 256 uniform bins and dequantize to centres.

    KBinsDiscretizer(uniform, ordinal) gives the bin index q over [min, max] of x_calib
    (values outside are clipped to the end bins); a StandardScaler with mean_ = -(lo/w + 0.5)
    and scale_ = 1/w maps q back to lo + (q + 0.5) * w. Constant features map to their value.
    """
    from sklearn.preprocessing import KBinsDiscretizer, StandardScaler

    x_calib = np.asarray(x_calib)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Feature k is constant": handled below
        bins = KBinsDiscretizer(
            n_bins=INT8_LEVELS, encode="ordinal", strategy="uniform", subsample=None
        ).fit(x_calib)
    lo = x_calib.min(axis=0).astype(np.float64)
    width = (x_calib.max(axis=0).astype(np.float64) - lo) / INT8_LEVELS
    constant = width == 0
    dequant = StandardScaler()
    dequant.mean_ = np.where(constant, -lo, -(lo / np.where(constant, 1, width) + 0.5))
    dequant.scale_ = np.where(constant, 1.0, 1.0 / np.where(constant, 1, width))
    dequant.var_ = dequant.scale_**2
    dequant.n_features_in_ = x_calib.shape[1]
    dequant.n_samples_seen_ = len(x_calib)
    return [("quantize", bins), ("dequantize", dequant)]


def int8_tree_thresholds(
    feature: np.ndarray, threshold: np.ndarray, edges: Sequence[np.ndarray]
) -> np.ndarray:
    """Thresholds that make raw float32 inputs split as their int8-quantized values would.

    For a split "x <= t" on feature f with bin edges e (centres c_q), the quantized input
    goes left iff its bin q has c_q <= t, i.e. q <= Q; raw x is in such a bin iff x < e[Q+1],
    so the new threshold is the largest float32 below e[Q+1]. Leaves keep their threshold.
    """
    new = np.asarray(threshold, dtype=np.float64).copy()
    for f in np.unique(feature[feature >= 0]):
        nodes = np.flatnonzero(feature == f)
        e = np.asarray(edges[f], dtype=np.float64)
        if e[0] == e[-1]:  # a constant feature: one bin whose centre is its value
            new[nodes] = np.where(e[0] <= new[nodes], _ALWAYS_LEFT, _ALWAYS_RIGHT)
            continue
        centres = (e[:-1] + e[1:]) / 2
        last = np.searchsorted(centres, new[nodes], side="right") - 1  # Q per node
        out = np.empty(len(nodes))
        out[last < 0] = _ALWAYS_RIGHT
        out[last >= len(centres) - 1] = _ALWAYS_LEFT
        inner = (last >= 0) & (last < len(centres) - 1)
        edge = e[last[inner] + 1]
        below = edge.astype(np.float32)
        below = np.where(below >= edge, np.nextafter(below, np.float32(-np.inf)), below)
        out[inner] = below.astype(np.float64)
        new[nodes] = out
    return new


def int8_edges(x_calib: np.ndarray) -> list[np.ndarray]:
    """Per-feature bin edges of the int8 grid (as `input_quantizer` bins); [v, v] if constant."""
    bins = input_quantizer(x_calib)[0][1]
    lo = np.asarray(x_calib).min(axis=0)
    return [
        e if np.isfinite(e).all() else np.array([lo[f], lo[f]], dtype=np.float64)
        for f, e in enumerate(bins.bin_edges_)
    ]


def _round_to(values: np.ndarray, dtype: Dtype) -> np.ndarray:
    values = np.asarray(values)
    return values.astype(dtype).astype(values.dtype)


def _quantize_rows_int8(coef: np.ndarray) -> np.ndarray:
    """Per-row symmetric int8 quantize-dequantize of a weight matrix."""
    coef = np.atleast_2d(np.asarray(coef, dtype=np.float64))
    scale = np.abs(coef).max(axis=1, keepdims=True) / 127.0
    scale[scale == 0] = 1.0
    return np.clip(np.round(coef / scale), -127, 127) * scale


def _kind(est: Any) -> str:
    from sklearn.ensemble import ExtraTreesClassifier, RandomForestClassifier
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.tree import DecisionTreeClassifier

    if isinstance(est, KNeighborsClassifier):
        return "knn"
    if isinstance(est, DecisionTreeClassifier):
        return "tree"
    if isinstance(est, RandomForestClassifier | ExtraTreesClassifier):
        return "forest"
    if hasattr(est, "coef_") and hasattr(est, "intercept_") and hasattr(est, "classes_"):
        return "linear"
    raise IncompatibleError(
        "precision supports KNeighborsClassifier, decision trees, random / extra-trees forests "
        f"and linear classifiers (coef_), optionally at the end of a Pipeline; got "
        f"{type(est).__name__}"
    )


def _tree_copy(tree_est: Any, dtype: Dtype, edges: Sequence[np.ndarray] | None) -> Any:
    """A copy of a fitted tree with thresholds rounded to `dtype` or moved onto the int8 grid."""
    tree = tree_est.tree_
    feature, threshold = tree.feature, tree.threshold
    if edges is not None:
        new = int8_tree_thresholds(feature, threshold, edges)
    else:
        split = feature >= 0
        new = threshold.copy()
        new[split] = _round_to(threshold[split], dtype)
    out = copy.copy(tree_est)
    out.tree_ = tree_with_thresholds(tree, new)
    return out


def _final_pathway(est: Any, dtype: Dtype, x_calib: np.ndarray) -> tuple[list[Any], Any]:
    """(extra pipeline steps before the model, the model) for one pathway."""
    from sklearn.base import clone

    kind = _kind(est)
    prefix = input_quantizer(x_calib) if dtype == "int8" else []
    if kind == "knn":
        stored = np.asarray(est._fit_X)
        if dtype == "int8":
            from sklearn.pipeline import Pipeline

            stored = Pipeline(prefix).transform(stored)
        else:
            stored = _round_to(stored, dtype)
        return prefix, clone(est).fit(stored, np.asarray(est.classes_)[est._y])
    if kind in ("tree", "forest"):
        edges = int8_edges(x_calib) if dtype == "int8" else None
        if kind == "tree":
            return [], _tree_copy(est, dtype, edges)
        forest = copy.copy(est)
        forest.estimators_ = [_tree_copy(t, dtype, edges) for t in est.estimators_]
        return [], forest
    linear = copy.deepcopy(est)
    coef = np.asarray(est.coef_)
    if dtype == "int8":
        linear.coef_ = _quantize_rows_int8(coef).reshape(coef.shape).astype(coef.dtype)
    else:
        linear.coef_ = _round_to(coef, dtype)
    return prefix, linear


def precision_pathway(model: Any, dtype: Dtype, x_calib: np.ndarray) -> Any:
    """The model on one precision pathway; a Pipeline's head steps stay as they are."""
    from sklearn.pipeline import Pipeline

    head: list[tuple[str, Any]] = []
    final = model
    if isinstance(model, Pipeline):
        head, (name, final) = list(model.steps[:-1]), model.steps[-1]
        if head:
            x_calib = Pipeline(head).transform(x_calib)
    else:
        name = "model"
    prefix, new_final = _final_pathway(final, dtype, x_calib)
    taken = {step_name for step_name, _ in head}
    prefix = [(f"{n}_{len(head)}" if n in taken else n, step) for n, step in prefix]
    steps = [*head, *prefix, (name, new_final)]
    return new_final if len(steps) == 1 else Pipeline(steps)


def quantized_bytes(model: Any, dtype: Dtype) -> dict[str, Any]:
    """Bytes the reduced-precision arrays would take on this pathway, plus their scales."""
    from sklearn.pipeline import Pipeline

    final = model.steps[-1][1] if isinstance(model, Pipeline) else model
    kind = _kind(final)
    size = _ITEMSIZE[dtype]
    n_features = int(final.n_features_in_)
    grid = 8 * n_features if dtype == "int8" else 0  # float32 low + width per input feature
    if kind == "knn":
        stored = np.asarray(final._fit_X)
        return {"array": "stored training points", "bytes": stored.size * size + grid}
    if kind in ("tree", "forest"):
        trees = [final] if kind == "tree" else final.estimators_
        splits = sum(int((t.tree_.feature >= 0).sum()) for t in trees)
        return {"array": "split thresholds", "bytes": splits * size + grid}
    coef = np.atleast_2d(final.coef_)
    row_scales = 4 * coef.shape[0] if dtype == "int8" else 0
    return {"array": "coef_ weights", "bytes": coef.size * size + row_scales + grid}


def precision_report(
    model: Any, *, x_calib: np.ndarray, x_eval: np.ndarray, y_eval: np.ndarray
) -> dict[str, dict[str, Any]]:
    """Per pathway: accuracy, agreement with the float32 pathway, and quantized bytes."""
    labels = {d: precision_pathway(model, d, x_calib).predict(x_eval) for d in DTYPES}
    original = model.predict(x_eval)
    return {
        d: {
            "accuracy": float(np.mean(labels[d] == y_eval)),
            "agreement_with_float32": agreement(labels["float32"], labels[d]),
            "agreement_with_input": agreement(original, labels[d]),
            "quantized": quantized_bytes(model, d),
        }
        for d in DTYPES
    }


# --- the step ------------------------------------------------------------------------------------


class PrecisionParams(BaseModel):
    """Params of the `precision` step."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dtype: Dtype = Field(
        default="int8",
        description="Pathway of the returned model: float32, float16 (stored numbers rounded) or "
        "int8 (per-feature affine input grid, stored data / thresholds / weights on it).",
    )
    timing_runs: int = Field(
        default=10, ge=2, le=1000, description="Timed runs per batch size for the latencies."
    )


def _brief(measured: dict[str, Any]) -> dict[str, Any]:
    keys = ("accuracy", "size_bytes", "latency_ms", "throughput_per_s")
    return {key: measured[key] for key in keys}


@register_step("precision", params=PrecisionParams, accepts={"sklearn"})
def precision(
    model: ModelArtifact, data: Dataset, params: PrecisionParams, ctx: StepContext
) -> StepOutput:
    """Simulate float32 / float16 / int8 storage of a KNN, tree, forest or linear model."""
    make_predictor(model).check_features(data.X_test)
    report = precision_report(
        model.obj, x_calib=data.X_train, x_eval=data.X_test, y_eval=data.y_test
    )
    out = ModelArtifact(
        "sklearn", precision_pathway(model.obj, params.dtype, data.X_train), dict(model.meta)
    )
    timing = MeasureParams(batch_sizes=[1, len(data.X_test)], warmup=2, runs=params.timing_runs)
    metrics = {
        "dtype": params.dtype,
        "reference": "float32",
        "calibration": f"per-feature min/max of the train split ({len(data.y_train)} rows)",
        "pathways": report,
        "agreement_with_float32": report[params.dtype]["agreement_with_float32"],
        "before": _brief(measure_model(model, data, timing)),
        "after": _brief(measure_model(out, data, timing)),
    }
    return StepOutput(model=out, metrics=metrics)


# --- CLI -----------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: put a model on a precision pathway; print one JSON line."""
    from modules.pipeline.script import script_main

    return script_main("precision", argv)


if __name__ == "__main__":
    raise SystemExit(main())
