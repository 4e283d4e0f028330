"""Feature-space pruning for scikit-learn models, and magnitude pruning of linear weights.

* variance ("neuron pruning" on the inputs): keep the highest-variance features;
* importance: keep the features a forest ranks highest (the model's own importances when
  it is a forest, else a seeded ExtraTrees fitted on the train split);
* mutual_info: keep the features sharing the most information with the label.
Each returns Pipeline(selector, model refitted on the kept features), so callers still pass
the original features. The selectors are stock scikit-learn objects (VarianceThreshold,
SelectKBest) that skops can load from an allow-list.
* coef_magnitude ("weight pruning"): zero the smallest |coef_| entries of a linear model,
  no refit; the model type stays the same.

CLI: python -m modules.compression.feature_prune --input-model m.skops --output-model s.skops
     --method importance --keep-ratio 0.5
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from modules.core.artifact import ModelArtifact
from modules.core.registry import register_step
from modules.core.step import StepContext, StepOutput
from modules.errors import IncompatibleError
from modules.evaluation.inference import make_predictor
from modules.evaluation.measure import MeasureParams, measure_model
from modules.storage.datasets import Dataset

Method = Literal["variance", "importance", "mutual_info", "coef_magnitude"]
SELECTOR_METHODS = ("variance", "importance", "mutual_info")


# --- pure functions ------------------------------------------------------------------------------


def forest_importances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Impurity importances of a seeded 100-tree ExtraTrees (a SelectKBest score function)."""
    from sklearn.ensemble import ExtraTreesClassifier

    forest = ExtraTreesClassifier(n_estimators=100, random_state=0).fit(x, y)
    return np.asarray(forest.feature_importances_)


def n_to_keep(n_features: int, keep_ratio: float) -> int:
    """round(keep_ratio * n_features), at least 1."""
    return max(1, min(n_features, round(keep_ratio * n_features)))


def variance_selector(x: np.ndarray, *, keep: int) -> Any:
    """A fitted VarianceThreshold keeping the `keep` highest-variance features.

    Ties at the cut keep all tied features; zero-variance features are never kept.
    """
    from sklearn.feature_selection import VarianceThreshold

    try:
        selector = VarianceThreshold(threshold=0.0).fit(x)
    except ValueError:  # sklearn's "no feature meets the threshold"
        raise IncompatibleError(
            "feature_prune: every feature is constant on the train split"
        ) from None
    ordered = np.sort(selector.variances_)[::-1]
    cut = ordered[min(keep, len(ordered)) - 1]
    below = selector.variances_[selector.variances_ < cut]
    # Keep everything strictly above the largest variance below the cut (ties survive).
    selector.set_params(threshold=float(below.max()) if below.size else 0.0)
    return selector


def score_selector(scores: np.ndarray, *, keep: int, score_func: Any) -> Any:
    """A SelectKBest marked fitted with precomputed `scores` (seeded, unlike a refit)."""
    from sklearn.feature_selection import SelectKBest

    selector = SelectKBest(score_func=score_func, k=keep)
    selector.scores_ = np.asarray(scores, dtype=np.float64)
    selector.pvalues_ = None
    selector.n_features_in_ = len(scores)
    return selector


def feature_scores(model: Any, x: np.ndarray, y: np.ndarray, *, method: str, seed: int) -> Any:
    """(scores, score_func) for the importance and mutual_info methods."""
    from sklearn.feature_selection import mutual_info_classif

    if method == "mutual_info":
        return mutual_info_classif(x, y, random_state=seed), mutual_info_classif
    own = getattr(model, "feature_importances_", None)
    if own is not None and len(own) == x.shape[1]:
        return np.asarray(own), forest_importances
    return forest_importances(x, y), forest_importances


def feature_select(
    model: Any, x: np.ndarray, y: np.ndarray, *, method: str, keep_ratio: float, seed: int = 0
) -> Any:
    """Pipeline(selector, copy of `model` refitted on the kept features of (x, y))."""
    from sklearn.base import clone
    from sklearn.pipeline import Pipeline

    keep = n_to_keep(x.shape[1], keep_ratio)
    if method == "variance":
        selector = variance_selector(x, keep=keep)
    elif method in ("importance", "mutual_info"):
        scores, func = feature_scores(model, x, y, method=method, seed=seed)
        selector = score_selector(scores, keep=keep, score_func=func)
    else:
        raise IncompatibleError(f"feature_prune: {method!r} is not a feature-selection method")
    refit = clone(model).fit(selector.transform(x), y)
    return Pipeline([("select", selector), ("model", refit)])


def coef_prune(model: Any, *, keep_ratio: float) -> Any:
    """A copy of a linear model with all but the largest `keep_ratio` of |coef_| set to zero."""
    coef = getattr(model, "coef_", None)
    if coef is None:
        raise IncompatibleError(
            f"feature_prune: method 'coef_magnitude' needs a linear model with coef_, "
            f"got {type(model).__name__}"
        )
    pruned = copy.deepcopy(model)
    flat = np.abs(np.asarray(coef)).ravel()
    keep = n_to_keep(flat.size, keep_ratio)
    # Stable order: among equal magnitudes the earlier weight survives, so results repeat.
    drop = np.argsort(-flat, kind="stable")[keep:]
    new = np.asarray(coef).copy().ravel()
    new[drop] = 0.0
    pruned.coef_ = new.reshape(np.shape(coef))
    return pruned


def kept_features(model: Any) -> np.ndarray | None:
    """Indices of the input features a pruned model still reads; None when all are."""
    select = getattr(model, "named_steps", {}).get("select")
    if select is not None:
        return np.flatnonzero(select.get_support())
    coef = getattr(model, "coef_", None)
    if coef is not None:
        return np.flatnonzero(np.abs(np.atleast_2d(coef)).sum(axis=0) > 0)
    return None


# --- the step ------------------------------------------------------------------------------------


class FeaturePruneParams(BaseModel):
    """Params of the `feature_prune` step."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Method = Field(
        default="variance",
        description="variance | importance | mutual_info (feature selection, model refitted), "
        "or coef_magnitude (zero the smallest linear weights).",
    )
    keep_ratio: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="Fraction in (0, 1] of the input features (or, for coef_magnitude, of the "
        "coef_ weights) to keep.",
    )
    timing_runs: int = Field(
        default=10, ge=2, le=1000, description="Timed runs per batch size for the latencies."
    )


def _brief(measured: dict[str, Any]) -> dict[str, Any]:
    keys = ("accuracy", "size_bytes", "params", "nonzero_params", "latency_ms", "throughput_per_s")
    return {key: measured[key] for key in keys}


@register_step("feature_prune", params=FeaturePruneParams, accepts={"sklearn"})
def feature_prune(
    model: ModelArtifact, data: Dataset, params: FeaturePruneParams, ctx: StepContext
) -> StepOutput:
    """Prune input features (variance, importance, mutual info) or small linear weights."""
    from sklearn.base import is_classifier

    est = model.obj
    if not is_classifier(est):
        raise IncompatibleError(
            f"feature_prune needs a fitted scikit-learn classifier, got {type(est).__name__}"
        )
    make_predictor(model).check_features(data.X_test)
    if params.method == "coef_magnitude":
        pruned = coef_prune(est, keep_ratio=params.keep_ratio)
    else:
        pruned = feature_select(
            est,
            data.X_train,
            data.y_train,
            method=params.method,
            keep_ratio=params.keep_ratio,
            seed=ctx.seed,
        )
    out = ModelArtifact("sklearn", pruned, dict(model.meta))
    kept = kept_features(pruned)
    timing = MeasureParams(batch_sizes=[1, len(data.X_test)], warmup=2, runs=params.timing_runs)
    metrics: dict[str, Any] = {
        "method": params.method,
        "features_before": data.n_features,
        "features_kept": data.n_features if kept is None else len(kept),
        "kept_feature_indices": None if kept is None else kept.tolist(),
        "before": _brief(measure_model(model, data, timing)),
        "after": _brief(measure_model(out, data, timing)),
    }
    if params.method == "coef_magnitude":
        coef = np.asarray(pruned.coef_)
        metrics["coef_sparsity"] = float(1 - np.count_nonzero(coef) / coef.size)
    metrics["accuracy_drop_pts"] = 100 * (
        metrics["before"]["accuracy"] - metrics["after"]["accuracy"]
    )
    return StepOutput(model=out, metrics=metrics)


# --- CLI -----------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: prune features or linear weights; print one JSON line."""
    from modules.pipeline.script import script_main

    return script_main("feature_prune", argv)


if __name__ == "__main__":
    raise SystemExit(main())
