"""KNN prototype reduction: keep a small set of training points, return a smaller fitted KNN.

Methods: Hart's condensed nearest neighbour (`knn_condense`), Wilson's edited nearest
neighbour as a cleaning pass before condensing (`knn_edit`), and class-wise k-means
centroids (`knn_kmeans_prototypes`). The step takes a target ratio of the stored
training set, or an accuracy tolerance: then the smallest ratio within it is searched
on a validation split carved from the model's stored training set, never the test split.

CLI: python -m modules.compression.knn_prototypes --input-model knn.skops
     --output-model small.skops --dataset digits --ratio 0.1 [--method condensed|kmeans|edited]
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from modules.core.artifact import ModelArtifact
from modules.core.registry import register_step
from modules.core.step import StepContext, StepOutput
from modules.errors import IncompatibleError
from modules.evaluation.inference import make_predictor
from modules.evaluation.measure import MeasureParams, measure_model
from modules.storage.datasets import Dataset

Method = Literal["condensed", "edited", "kmeans"]
DEFAULT_SEARCH_RATIOS = (0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0)


# --- pure functions ------------------------------------------------------------------------------


def _distances_to(x: np.ndarray, point: np.ndarray, *, metric: str, p: float) -> np.ndarray:
    """Distances from every row of x to one point, computed exactly in float64 where we can.

    Exact differences (not sklearn's dot-product trick) keep ties ties, which the
    tie-aware condensing below relies on.
    """
    diff = np.abs(np.asarray(x, dtype=np.float64) - np.asarray(point, dtype=np.float64))
    if metric == "euclidean":
        return np.sqrt(np.einsum("ij,ij->i", diff, diff))
    if metric in ("manhattan", "cityblock", "l1"):
        return diff.sum(axis=1)
    if metric in ("chebyshev", "infinity"):
        return diff.max(axis=1)
    if metric == "minkowski":
        return (diff**p).sum(axis=1) ** (1.0 / p)
    from sklearn.metrics import pairwise_distances

    return pairwise_distances(x, point[None, :], metric=metric).ravel()


def knn_condense(
    x: np.ndarray,
    y: np.ndarray,
    *,
    seed: int = 0,
    metric: str = "euclidean",
    p: float = 2.0,
) -> np.ndarray:
    """Hart's condensed nearest neighbour: indices of a subset the 1-NN rule is consistent with.

    Starts from one random point per class, then sweeps the data in a seeded order,
    adding every point whose nearest stored point has another label, until a sweep adds
    nothing. A point whose nearest stored points tie across labels counts as misclassified,
    so any 1-NN tie-breaking classifies every absorbed point correctly. Returns the indices
    in the order they were added.
    """
    y = np.asarray(y)
    n = len(y)
    rng = np.random.default_rng(seed)
    best = np.full(n, np.inf)
    label = np.full(n, -1, dtype=np.int64)
    tied = np.zeros(n, dtype=bool)
    stored = np.zeros(n, dtype=bool)
    order: list[int] = []
    codes = np.unique(y, return_inverse=True)[1]

    def add(j: int) -> None:
        d = _distances_to(x, x[j], metric=metric, p=p)
        closer = d < best
        same = (d == best) & ~closer
        tied[same & (label != codes[j])] = True
        best[closer], label[closer], tied[closer] = d[closer], codes[j], False
        stored[j] = True
        order.append(j)

    for cls in np.unique(codes):
        add(int(rng.choice(np.flatnonzero(codes == cls))))
    changed = True
    while changed:
        changed = False
        for i in rng.permutation(n):
            if not stored[i] and (label[i] != codes[i] or tied[i]):
                add(int(i))
                changed = True
    return np.asarray(order, dtype=np.int64)


def knn_edit(
    x: np.ndarray,
    y: np.ndarray,
    *,
    k: int = 3,
    metric: str = "euclidean",
    p: float = 2.0,
) -> np.ndarray:
    """Wilson's edited nearest neighbour: indices of the points their k neighbours agree with.

    A point is dropped when its k nearest other points vote for another label (a tied
    vote that includes its own label keeps it). A class is never emptied: if editing
    would remove all of a class, its points stay.
    """
    from sklearn.neighbors import NearestNeighbors

    y = np.asarray(y)
    classes, codes = np.unique(y, return_inverse=True)
    k = min(k, len(y) - 1)
    if k < 1:
        return np.arange(len(y))
    nn = NearestNeighbors(n_neighbors=k, metric=metric, p=p).fit(x)
    neighbours = nn.kneighbors(return_distance=False)  # X=None: each point's own row excluded
    votes = np.zeros((len(y), len(classes)), dtype=np.int64)
    np.add.at(votes, (np.repeat(np.arange(len(y)), k), codes[neighbours].ravel()), 1)
    keep = votes[np.arange(len(y)), codes] == votes.max(axis=1)
    for cls in range(len(classes)):
        members = codes == cls
        if not keep[members].any():
            keep[members] = True
    return np.flatnonzero(keep)


def prototype_counts(y: np.ndarray, *, ratio: float) -> dict[Any, int]:
    """Prototypes per class for a ratio: round(ratio * class size), at least 1."""
    classes, sizes = np.unique(y, return_counts=True)
    return {
        cls: int(min(size, max(1, round(ratio * size))))
        for cls, size in zip(classes.tolist(), sizes.tolist(), strict=True)
    }


def knn_kmeans_prototypes(
    x: np.ndarray,
    y: np.ndarray,
    *,
    ratio: float,
    seed: int = 0,
    n_init: int = 3,
) -> tuple[np.ndarray, np.ndarray]:
    """Class-wise k-means: `prototype_counts(y, ratio)` centroids per class (Euclidean)."""
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    xs, ys = [], []
    for cls, count in prototype_counts(y, ratio=ratio).items():
        members = np.asarray(x[y == cls], dtype=np.float64)
        if count >= len(members):
            centres = members
        else:
            with warnings.catch_warnings():
                # Fewer distinct points than clusters: KMeans warns, the centroids stay usable.
                warnings.simplefilter("ignore", ConvergenceWarning)
                km = KMeans(n_clusters=count, n_init=n_init, random_state=seed).fit(members)
            centres = km.cluster_centers_
        xs.append(centres)
        ys.append(np.full(len(centres), cls, dtype=np.asarray(y).dtype))
    return np.vstack(xs).astype(x.dtype, copy=False), np.concatenate(ys)


def _cap_per_class(order: np.ndarray, y: np.ndarray, *, ratio: float) -> np.ndarray:
    """The first-added `prototype_counts` indices of each class from a condensed order."""
    quota = prototype_counts(y, ratio=ratio)
    taken = dict.fromkeys(quota, 0)
    keep = []
    for idx in order:
        cls = y[idx].item()
        if taken[cls] < quota[cls]:
            taken[cls] += 1
            keep.append(idx)
    return np.asarray(keep, dtype=np.int64)


def knn_reduce(
    x: np.ndarray,
    y: np.ndarray,
    *,
    method: Method,
    ratio: float | None,
    seed: int = 0,
    edit_k: int = 3,
    metric: str = "euclidean",
    p: float = 2.0,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Prototypes (x, y) by `method`; `ratio` caps condensed/edited sets, sizes k-means ones.

    Condensed and edited sets have a natural size; when it is above the ratio, each class
    keeps its first-added points up to its quota (Hart adds the most needed points first).
    """
    info: dict[str, Any] = {"method": method}
    if method == "kmeans":
        if ratio is None:
            raise IncompatibleError("knn_prototypes: method 'kmeans' needs a ratio")
        px, py = knn_kmeans_prototypes(x, y, ratio=ratio, seed=seed)
        return px, py, info
    pool = np.arange(len(y))
    if method == "edited":
        pool = knn_edit(x, y, k=edit_k, metric=metric, p=p)
        info["edited_out"] = len(y) - len(pool)
    order = pool[knn_condense(x[pool], y[pool], seed=seed, metric=metric, p=p)]
    info["natural_prototypes"] = len(order)
    if ratio is not None:
        capped = _cap_per_class(order, y, ratio=ratio)
        info["capped"] = bool(len(capped) < len(order))
        order = capped
    return x[order], y[order], info


def knn_from_prototypes(template: Any, x: np.ndarray, y: np.ndarray, *, n_neighbors: int) -> Any:
    """A new fitted KNN with the template's metric and weights, on the given prototypes."""
    from sklearn.base import clone

    if n_neighbors > len(y):
        raise IncompatibleError(
            f"knn_prototypes: n_neighbors={n_neighbors} but only {len(y)} prototypes are kept; "
            "raise the ratio or lower n_neighbors"
        )
    return clone(template).set_params(n_neighbors=n_neighbors).fit(x, y)


def search_ratio(
    template: Any,
    x: np.ndarray,
    y: np.ndarray,
    *,
    method: Method,
    ratios: Sequence[float],
    tolerance: float,
    val_fraction: float,
    n_neighbors: int,
    seed: int = 0,
    edit_k: int = 3,
) -> tuple[float | None, list[dict[str, Any]]]:
    """Smallest ratio within `tolerance` (a fraction) of the unreduced validation accuracy.

    The validation split is carved from (x, y); returns (None, table) when no ratio is within.
    """
    from sklearn.base import clone
    from sklearn.model_selection import train_test_split

    _, counts = np.unique(y, return_counts=True)
    if counts.min() < 2:
        raise IncompatibleError(
            "knn_prototypes: the accuracy-tolerance search needs at least 2 stored samples "
            "per class to carve a validation split; give a ratio instead"
        )
    fit_idx, val_idx = train_test_split(
        np.arange(len(y)), test_size=val_fraction, stratify=y, random_state=seed
    )
    xf, yf, xv, yv = x[fit_idx], y[fit_idx], x[val_idx], y[val_idx]
    reference = float(clone(template).fit(xf, yf).score(xv, yv))
    metric, p = _metric_of(template)
    table: list[dict[str, Any]] = []
    for ratio in sorted(set(ratios)):
        px, py, info = knn_reduce(
            xf, yf, method=method, ratio=ratio, seed=seed, edit_k=edit_k, metric=metric, p=p
        )
        k = min(n_neighbors, len(py))
        acc = float(knn_from_prototypes(template, px, py, n_neighbors=k).score(xv, yv))
        row = {"ratio": ratio, "prototypes": len(py), "val_accuracy": acc}
        row["within_tolerance"] = reference - acc <= tolerance + 1e-12
        table.append(row)
        if row["within_tolerance"]:
            return ratio, [{"reference_val_accuracy": reference}, *table]
        if info.get("capped") is False:
            break  # the condensed set is at its natural size: larger ratios give the same set
    return None, [{"reference_val_accuracy": reference}, *table]


def _metric_of(knn: Any) -> tuple[str, float]:
    metric = str(getattr(knn, "effective_metric_", knn.metric))
    params = getattr(knn, "effective_metric_params_", None) or {}
    return metric, float(params.get("p", knn.p or 2))


def _stored_training_set(knn: Any) -> tuple[np.ndarray, np.ndarray]:
    """(x, labels) of the points a fitted KNeighborsClassifier keeps."""
    import scipy.sparse as sp
    from sklearn.neighbors import KNeighborsClassifier

    if not isinstance(knn, KNeighborsClassifier):
        raise IncompatibleError(
            f"knn_prototypes needs a KNeighborsClassifier, got {type(knn).__name__}"
        )
    if knn.metric == "precomputed" or sp.issparse(knn._fit_X):
        raise IncompatibleError(
            "knn_prototypes needs a KNN fitted on dense features (not sparse or precomputed)"
        )
    if np.ndim(knn._y) != 1:
        raise IncompatibleError("knn_prototypes supports single-output KNN classifiers only")
    return np.asarray(knn._fit_X), np.asarray(knn.classes_)[knn._y]


# --- the step ------------------------------------------------------------------------------------


# k-means at 10% lost 0.27 pt on digits where condensed (natural size, 10.1%) lost 2.85
# (benchmarks/results/sklearn_compression.md).
DEFAULT_KMEANS_RATIO = 0.1


class KnnPrototypesParams(BaseModel):
    """Params of the `knn_prototypes` step."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Method = Field(
        default="kmeans",
        description="kmeans (class-wise centroids; the default: the best accuracy per kept point "
        "in benchmarks/results/sklearn_compression.md), condensed (Hart) or edited (Wilson "
        f"editing, then Hart). kmeans with neither ratio nor tolerance_pts keeps "
        f"{DEFAULT_KMEANS_RATIO:g} of the points.",
    )
    ratio: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Fraction of the stored training points to keep, in (0, 1]. For condensed/"
        "edited a cap on their natural size; required for kmeans unless tolerance_pts is set.",
    )
    tolerance_pts: float | None = Field(
        default=None,
        ge=0,
        le=100,
        description="Instead of a ratio: the largest validation-accuracy drop allowed, in "
        "percentage points; the smallest ratio of search_ratios within it is used.",
    )
    search_ratios: list[Annotated[float, Field(gt=0, le=1)]] = Field(
        default=list(DEFAULT_SEARCH_RATIOS),
        min_length=1,
        max_length=32,
        description="Ratios tried, smallest first, by the tolerance search (each in (0, 1]).",
    )
    val_fraction: float = Field(
        default=0.2,
        ge=0.05,
        le=0.5,
        description="Share of the stored training set held out for the tolerance search.",
    )
    n_neighbors: int | None = Field(
        default=None,
        ge=1,
        le=1000,
        description="k of the returned KNN; None keeps 1 (prototype sets are built for 1-NN).",
    )
    edit_k: int = Field(
        default=3, ge=1, le=50, description="Neighbours that vote in Wilson editing (edited)."
    )
    timing_runs: int = Field(
        default=10, ge=2, le=1000, description="Timed runs per batch size for the latencies."
    )

    @field_validator("search_ratios")
    @classmethod
    def _ratios_in_range(cls, value: list[float]) -> list[float]:
        bad = [r for r in value if not 0 < r <= 1]
        if bad:
            raise ValueError(f"search ratios must lie in (0, 1], got {bad}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _kmeans_ratio(cls, data: Any) -> Any:
        """k-means needs a size: DEFAULT_KMEANS_RATIO when neither target is given."""
        if (
            isinstance(data, dict)
            and data.get("method", "kmeans") == "kmeans"
            and data.get("ratio") is None
            and data.get("tolerance_pts") is None
        ):
            return {**data, "ratio": DEFAULT_KMEANS_RATIO}
        return data

    @model_validator(mode="after")
    def _one_target(self) -> KnnPrototypesParams:
        if self.ratio is not None and self.tolerance_pts is not None:
            raise ValueError("give ratio or tolerance_pts, not both")
        return self


def _brief(measured: dict[str, Any]) -> dict[str, Any]:
    keys = ("accuracy", "size_bytes", "latency_ms", "throughput_per_s", "memory")
    return {key: measured[key] for key in keys}


def knn_shrink(
    knn: Any, params: KnnPrototypesParams, *, seed: int = 0
) -> tuple[Any, dict[str, Any]]:
    """The step's transformation without measuring: (smaller fitted KNN, what was done)."""
    x, y = _stored_training_set(knn)
    k = params.n_neighbors or 1
    metric, p = _metric_of(knn)
    ratio = params.ratio
    info: dict[str, Any] = {"method": params.method}
    if params.tolerance_pts is not None:
        ratio, table = search_ratio(
            knn,
            x,
            y,
            method=params.method,
            ratios=params.search_ratios,
            tolerance=params.tolerance_pts / 100.0,
            val_fraction=params.val_fraction,
            n_neighbors=k,
            seed=seed,
            edit_k=params.edit_k,
        )
        info.update(search=table, within_tolerance=ratio is not None)
    if params.tolerance_pts is not None and ratio is None:
        # No ratio met the tolerance: the honest result is the unreduced model.
        px, py, k = x, y, knn.n_neighbors
        info["reduced"] = False
    else:
        px, py, done = knn_reduce(
            x,
            y,
            method=params.method,
            ratio=ratio,
            seed=seed,
            edit_k=params.edit_k,
            metric=metric,
            p=p,
        )
        info.update(done)
    small = knn_from_prototypes(knn, px, py, n_neighbors=k)
    classes, per_class = np.unique(py, return_counts=True)
    info.update(
        n_neighbors=k,
        ratio=ratio,
        prototypes_before=len(y),
        prototypes_after=len(py),
        kept_fraction=len(py) / len(y),
        prototypes_per_class=dict(zip(classes.tolist(), per_class.tolist(), strict=True)),
        stored_bytes_before=int(x.nbytes),
        stored_bytes_after=int(np.asarray(small._fit_X).nbytes),
    )
    return small, info


@register_step("knn_prototypes", params=KnnPrototypesParams, accepts={"sklearn"})
def knn_prototypes(
    model: ModelArtifact, data: Dataset, params: KnnPrototypesParams, ctx: StepContext
) -> StepOutput:
    """Reduce a KNN's stored training set (condensed, edited or k-means prototypes)."""
    _stored_training_set(model.obj)  # the type check first: its message beats a feature count
    make_predictor(model).check_features(data.X_test)
    small, metrics = knn_shrink(model.obj, params, seed=ctx.seed)
    out = ModelArtifact("sklearn", small, dict(model.meta))
    timing = MeasureParams(batch_sizes=[1, len(data.X_test)], warmup=2, runs=params.timing_runs)
    metrics["before"] = _brief(measure_model(model, data, timing))
    metrics["after"] = _brief(measure_model(out, data, timing))
    metrics["accuracy_drop_pts"] = 100 * (
        metrics["before"]["accuracy"] - metrics["after"]["accuracy"]
    )
    return StepOutput(model=out, metrics=metrics)


# --- CLI -----------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: reduce a KNN's prototypes; print one JSON line."""
    from modules.pipeline.script import script_main

    return script_main("knn_prototypes", argv)


if __name__ == "__main__":
    raise SystemExit(main())
