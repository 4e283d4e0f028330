"""Forest pruning: fewer trees, chosen greedily, and smaller trees (cost-complexity, depth).

Works on fitted RandomForestClassifier / ExtraTreesClassifier models. Per-tree pruning
runs first, so trees are ranked as they will be used; then `forest_drop_trees` keeps
the trees a greedy forward selection picks by the ensemble's validation accuracy.
Validation is out-of-bag when the forest was bootstrapped on the dataset's train split
(each sample is voted on only by the trees that never saw it), else a holdout carved
from the train split (biased when the forest was trained on it: the step says which).

CLI: python -m modules.compression.forest_prune --input-model rf.skops
     --output-model small.skops --dataset digits --n-trees 20 [--ccp-alpha 0.001]
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from modules.core.artifact import ModelArtifact
from modules.core.registry import register_step
from modules.core.step import StepContext, StepOutput
from modules.errors import BadInputError, IncompatibleError
from modules.evaluation.inference import make_predictor
from modules.evaluation.measure import MeasureParams, measure_model
from modules.storage.datasets import Dataset

_LEAF = -1  # sklearn.tree._tree.TREE_LEAF
_UNDEFINED = -2  # sklearn.tree._tree.TREE_UNDEFINED


# --- tree surgery --------------------------------------------------------------------------------


def rebuild_tree(tree: Any, *, nodes: np.ndarray, values: np.ndarray, max_depth: int) -> Any:
    """A new sklearn Tree with the given node records and values, via its pickling protocol."""
    cls, args, state = tree.__reduce__()
    new = cls(*args)
    new.__setstate__(
        {
            **state,
            "max_depth": int(max_depth),
            "node_count": len(nodes),
            "nodes": np.ascontiguousarray(nodes),
            "values": np.ascontiguousarray(values),
        }
    )
    return new


def node_depths(tree: Any) -> np.ndarray:
    """Depth of every node (root 0)."""
    left, right = tree.children_left, tree.children_right
    depth = np.zeros(tree.node_count, dtype=np.int64)
    stack = [0]
    while stack:
        node = stack.pop()
        if left[node] != _LEAF:
            depth[left[node]] = depth[right[node]] = depth[node] + 1
            stack += [int(left[node]), int(right[node])]
    return depth


def tree_truncate_depth(tree: Any, max_depth: int) -> Any:
    """The tree cut at `max_depth`: nodes at that depth become leaves with their class mix."""
    state = tree.__getstate__()
    depth = node_depths(tree)
    if depth.max(initial=0) <= max_depth:
        return tree
    keep = depth <= max_depth
    new_index = np.cumsum(keep) - 1
    nodes = state["nodes"][keep].copy()
    cut = depth[keep] == max_depth
    internal = (nodes["left_child"] != _LEAF) & ~cut
    for side in ("left_child", "right_child"):
        nodes[side] = np.where(internal, new_index[np.maximum(nodes[side], 0)], _LEAF)
    nodes["feature"][cut] = _UNDEFINED
    nodes["threshold"][cut] = _UNDEFINED
    return rebuild_tree(tree, nodes=nodes, values=state["values"][keep], max_depth=max_depth)


def tree_with_thresholds(tree: Any, thresholds: np.ndarray) -> Any:
    """The same tree with new split thresholds (leaves keep theirs)."""
    state = tree.__getstate__()
    nodes = state["nodes"].copy()
    nodes["threshold"] = thresholds
    return rebuild_tree(tree, nodes=nodes, values=state["values"], max_depth=state["max_depth"])


def prune_tree(estimator: Any, *, ccp_alpha: float = 0.0, max_depth: int | None = None) -> Any:
    """A copy of a fitted decision tree, cost-complexity pruned and/or cut at a depth."""
    pruned = copy.deepcopy(estimator)
    if ccp_alpha > 0:
        # sklearn's own minimal cost-complexity pruning, on the tree's stored impurities.
        pruned.set_params(ccp_alpha=ccp_alpha)
        pruned._prune_tree()
    if max_depth is not None:
        pruned.tree_ = tree_truncate_depth(pruned.tree_, max_depth)
        pruned.set_params(max_depth=max_depth)
    return pruned


# --- forests -------------------------------------------------------------------------------------


def check_forest(forest: Any, *, step: str) -> None:
    """Refuse anything that is not a fitted random or extra-trees classifier."""
    from sklearn.ensemble import ExtraTreesClassifier, RandomForestClassifier

    if not isinstance(forest, RandomForestClassifier | ExtraTreesClassifier):
        raise IncompatibleError(
            f"{step} needs a RandomForestClassifier or ExtraTreesClassifier, "
            f"got {type(forest).__name__}"
        )
    if np.ndim(forest.classes_[0]) != 0 or getattr(forest, "n_outputs_", 1) != 1:
        raise IncompatibleError(f"{step} supports single-output forests only")


def forest_nodes(forest: Any) -> int:
    """Total node count over the forest's trees."""
    return int(sum(t.tree_.node_count for t in forest.estimators_))


def forest_keep_trees(forest: Any, indices: Sequence[int]) -> Any:
    """A copy of the forest holding only the trees at `indices`, in that order."""
    small = copy.copy(forest)
    small.estimators_ = [forest.estimators_[i] for i in indices]
    small.n_estimators = len(small.estimators_)
    # Out-of-bag results describe the full forest; drop them rather than keep a wrong number.
    for attr in ("oob_score_", "oob_decision_function_"):
        small.__dict__.pop(attr, None)
    return small


def tree_probas(forest: Any, x: np.ndarray) -> np.ndarray:
    """Each tree's class probabilities on x, shape (trees, samples, classes)."""
    x = np.asarray(x, dtype=np.float32)
    return np.stack([tree.predict_proba(x) for tree in forest.estimators_])


def oob_masks(forest: Any, n_samples: int) -> np.ndarray | None:
    """(trees, samples) True where a sample was out of a tree's bootstrap; None without one."""
    if not getattr(forest, "bootstrap", False) or getattr(forest, "_n_samples", None) != n_samples:
        return None
    mask = np.ones((len(forest.estimators_), n_samples), dtype=bool)
    for t, in_bag in enumerate(forest.estimators_samples_):
        mask[t, in_bag] = False
    return mask


def rank_trees_greedy(
    probas: np.ndarray, codes: np.ndarray, *, n_select: int, mask: np.ndarray | None = None
) -> list[int]:
    """Greedy forward selection: each round adds the tree that most raises ensemble accuracy.

    probas: (trees, samples, classes); codes: true class index per sample; mask: which
    (tree, sample) votes count (out-of-bag), all when None. A sample with no vote yet is
    wrong. Ties go to the higher mean probability of the true class.
    """
    n_trees, n_samples, _ = probas.shape
    votes = probas if mask is None else probas * mask[:, :, None]
    total = np.zeros(probas.shape[1:])
    chosen: list[int] = []
    available = np.ones(n_trees, dtype=bool)
    rows = np.arange(n_samples)
    for _ in range(min(n_select, n_trees)):
        trial = total[None] + votes  # (trees, samples, classes)
        voted = trial.sum(axis=2) > 0
        correct = (trial.argmax(axis=2) == codes[None]) & voted
        accuracy = correct.mean(axis=1)
        share = trial[:, rows, codes] / np.maximum(trial.sum(axis=2), 1e-12)
        score = accuracy + 1e-6 * share.mean(axis=1)  # accuracy first, soft score breaks ties
        score[~available] = -np.inf
        best = int(score.argmax())
        chosen.append(best)
        available[best] = False
        total += votes[best]
    return chosen


def ensemble_accuracy(
    probas: np.ndarray, codes: np.ndarray, *, mask: np.ndarray | None = None
) -> float:
    """Accuracy of averaging the given trees' probabilities (masked votes when given)."""
    votes = probas if mask is None else probas * mask[:, :, None]
    total = votes.sum(axis=0)
    return float(((total.argmax(axis=1) == codes) & (total.sum(axis=1) > 0)).mean())


def forest_drop_trees(
    forest: Any,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    n_trees: int,
    mask: np.ndarray | None = None,
) -> tuple[Any, list[int]]:
    """Keep `n_trees` trees, picked greedily by validation accuracy; returns (forest, order)."""
    if not 1 <= n_trees <= len(forest.estimators_):
        raise IncompatibleError(
            f"n_trees={n_trees} is out of range: the forest has {len(forest.estimators_)} trees"
        )
    codes = np.searchsorted(forest.classes_, y_val)
    order = rank_trees_greedy(tree_probas(forest, x_val), codes, n_select=n_trees, mask=mask)
    return forest_keep_trees(forest, order), order


def forest_tree_sweep(
    forest: Any,
    *,
    x_val: np.ndarray,
    y_val: np.ndarray,
    counts: Sequence[int],
    mask: np.ndarray | None = None,
    order: Literal["greedy", "first"] = "greedy",
    x_eval: np.ndarray | None = None,
    y_eval: np.ndarray | None = None,
    size_of: Callable[[Any], int] | None = None,
) -> list[dict[str, Any]]:
    """One row per tree count: validation (and eval) accuracy, nodes and optional size.

    Greedy selection is nested, so one ranking up to max(counts) gives every prefix.
    """
    counts = sorted({int(c) for c in counts})
    if not counts or counts[0] < 1 or counts[-1] > len(forest.estimators_):
        raise IncompatibleError(
            f"sweep counts {counts} must lie in 1..{len(forest.estimators_)} (the forest's trees)"
        )
    codes = np.searchsorted(forest.classes_, y_val)
    val_probas = tree_probas(forest, x_val)
    if order == "greedy":
        ranked = rank_trees_greedy(val_probas, codes, n_select=counts[-1], mask=mask)
    else:
        ranked = list(range(counts[-1]))
    eval_probas = tree_probas(forest, x_eval) if x_eval is not None else None
    eval_codes = np.searchsorted(forest.classes_, y_eval) if y_eval is not None else None
    rows = []
    for count in counts:
        picked = ranked[:count]
        sub_mask = mask[picked] if mask is not None else None
        row: dict[str, Any] = {
            "n_trees": count,
            "order": order,
            "val_accuracy": ensemble_accuracy(val_probas[picked], codes, mask=sub_mask),
            "nodes": int(sum(forest.estimators_[i].tree_.node_count for i in picked)),
        }
        if eval_probas is not None and eval_codes is not None:
            row["eval_accuracy"] = ensemble_accuracy(eval_probas[picked], eval_codes)
        if size_of is not None:
            row["size_bytes"] = int(size_of(forest_keep_trees(forest, picked)))
        rows.append(row)
    return rows


def validation_set(
    forest: Any,
    data: Dataset,
    *,
    how: Literal["auto", "oob", "holdout"],
    val_fraction: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, str]:
    """(x, y, mask, description) to rank trees on: out-of-bag train rows or a train holdout."""
    from sklearn.model_selection import train_test_split

    mask = None
    if how in ("auto", "oob"):
        mask = oob_masks(forest, len(data.y_train))
        if mask is not None and not _looks_like_training_rows(forest, data, mask):
            mask = None
        if mask is None and how == "oob":
            raise IncompatibleError(
                "forest_prune: out-of-bag validation needs a bootstrapped forest trained on this "
                f"dataset's train split ({len(data.y_train)} rows, same seed); use "
                "validation='holdout'"
            )
    if mask is not None:
        return data.X_train, data.y_train, mask, "oob (train rows, out-of-bag votes only)"
    _, x_val, _, y_val = train_test_split(
        data.X_train,
        data.y_train,
        test_size=val_fraction,
        stratify=data.y_train,
        random_state=seed,
    )
    return x_val, y_val, None, f"holdout ({val_fraction:.0%} of the train split)"


def _looks_like_training_rows(forest: Any, data: Dataset, mask: np.ndarray) -> bool:
    """True when trees fit their bootstrap rows better than their out-of-bag rows.

    About equal means these are not the rows the forest was trained on (another split or seed).
    """
    few = min(len(forest.estimators_), 10)
    codes = np.searchsorted(forest.classes_, data.y_train)
    probas = tree_probas(forest_keep_trees(forest, range(few)), data.X_train)
    right = probas.argmax(axis=2) == codes[None]
    m = mask[:few]
    in_bag = right[~m].mean() if (~m).any() else 0.0
    out_bag = right[m].mean() if m.any() else 0.0
    return bool(in_bag - out_bag > 0.01)


# --- the step ------------------------------------------------------------------------------------


class ForestPruneParams(BaseModel):
    """Params of the `forest_prune` step.

    With none of n_trees, ccp_alpha or max_depth set, the forest passes through unchanged
    (useful with sweep_trees alone).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    n_trees: int | None = Field(
        default=None,
        ge=1,
        le=10_000,
        description="Trees to keep (at most the forest's count), chosen greedily; None keeps all.",
    )
    ccp_alpha: float = Field(
        default=0.0, ge=0, le=1.0, description="Minimal cost-complexity pruning alpha per tree."
    )
    max_depth: int | None = Field(
        default=None, ge=1, le=1000, description="Cut every tree at this depth; None: no cut."
    )
    validation: Literal["auto", "oob", "holdout"] = Field(
        default="auto",
        description="How trees are ranked: out-of-bag votes on the train split (auto when the "
        "forest is bootstrapped on it) or a holdout carved from the train split.",
    )
    val_fraction: float = Field(
        default=0.2, ge=0.05, le=0.5, description="Share of the train split used as holdout."
    )
    sweep_trees: list[Annotated[int, Field(ge=1, le=10_000)]] = Field(
        default_factory=list,
        max_length=32,
        description="Tree counts to report validation accuracy, nodes and size for (greedy "
        "order; each 1 to 10000).",
    )
    timing_runs: int = Field(
        default=10, ge=2, le=1000, description="Timed runs per batch size for the latencies."
    )

    @field_validator("sweep_trees")
    @classmethod
    def _positive_counts(cls, value: list[int]) -> list[int]:
        if any(c < 1 for c in value):
            raise ValueError(f"tree counts must be at least 1, got {value}")
        return value


def _brief(measured: dict[str, Any]) -> dict[str, Any]:
    keys = ("accuracy", "size_bytes", "latency_ms", "throughput_per_s", "memory")
    return {key: measured[key] for key in keys}


def forest_shrink(
    forest: Any, data: Dataset, params: ForestPruneParams, *, seed: int = 0
) -> tuple[Any, dict[str, Any]]:
    """The step's transformation without timing: (pruned forest, what was done)."""
    from modules.storage.model_formats import save_model

    check_forest(forest, step="forest_prune")
    n_have = len(forest.estimators_)
    too_many = [c for c in [params.n_trees, *params.sweep_trees] if c is not None and c > n_have]
    if too_many:
        raise BadInputError(
            f"forest_prune: asked for {max(too_many)} trees but the forest has {n_have}"
        )
    pruned = copy.copy(forest)
    if params.ccp_alpha > 0 or params.max_depth is not None:
        pruned.estimators_ = [
            prune_tree(tree, ccp_alpha=params.ccp_alpha, max_depth=params.max_depth)
            for tree in forest.estimators_
        ]
    x_val, y_val, mask, how = validation_set(
        pruned, data, how=params.validation, val_fraction=params.val_fraction, seed=seed
    )
    info: dict[str, Any] = {"validation": how, "trees_before": n_have}
    if params.sweep_trees:
        info["sweep"] = forest_tree_sweep(
            pruned,
            x_val=x_val,
            y_val=y_val,
            counts=params.sweep_trees,
            mask=mask,
            size_of=lambda f: len(save_model(ModelArtifact("sklearn", f))),
        )
    order = list(range(n_have))
    if params.n_trees is not None:
        pruned, order = forest_drop_trees(pruned, x_val, y_val, n_trees=params.n_trees, mask=mask)
    codes = np.searchsorted(forest.classes_, y_val)
    info.update(
        trees_after=len(pruned.estimators_),
        kept_trees=order,
        nodes_before=forest_nodes(forest),
        nodes_after=forest_nodes(pruned),
        val_accuracy_before=ensemble_accuracy(tree_probas(forest, x_val), codes, mask=mask),
        val_accuracy_after=ensemble_accuracy(
            tree_probas(pruned, x_val), codes, mask=mask[order] if mask is not None else None
        ),
    )
    return pruned, info


@register_step("forest_prune", params=ForestPruneParams, accepts={"sklearn"})
def forest_prune(
    model: ModelArtifact, data: Dataset, params: ForestPruneParams, ctx: StepContext
) -> StepOutput:
    """Shrink a random / extra-trees forest: greedy tree dropping, ccp_alpha and depth limits."""
    check_forest(model.obj, step="forest_prune")
    make_predictor(model).check_features(data.X_test)
    pruned, metrics = forest_shrink(model.obj, data, params, seed=ctx.seed)
    out = ModelArtifact("sklearn", pruned, dict(model.meta))
    timing = MeasureParams(batch_sizes=[1, len(data.X_test)], warmup=2, runs=params.timing_runs)
    metrics["before"] = _brief(measure_model(model, data, timing))
    metrics["after"] = _brief(measure_model(out, data, timing))
    metrics["size_ratio"] = metrics["before"]["size_bytes"] / metrics["after"]["size_bytes"]
    metrics["accuracy_drop_pts"] = 100 * (
        metrics["before"]["accuracy"] - metrics["after"]["accuracy"]
    )
    return StepOutput(model=out, metrics=metrics)


# --- CLI -----------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: prune a random / extra-trees forest; print one JSON line."""
    from modules.pipeline.script import script_main

    return script_main("forest_prune", argv)


if __name__ == "__main__":
    raise SystemExit(main())
