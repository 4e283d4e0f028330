import numpy as np
import pytest
from sklearn.ensemble import ExtraTreesClassifier, RandomForestClassifier
from sklearn.neighbors import KNeighborsClassifier
from sklearn.tree import DecisionTreeClassifier

from modules.compression.forest_prune import (
    forest_drop_trees,
    forest_nodes,
    forest_tree_sweep,
    node_depths,
    oob_masks,
    prune_tree,
    rank_trees_greedy,
    tree_truncate_depth,
    validation_set,
)
from modules.core.artifact import ModelArtifact
from modules.errors import BadInputError, IncompatibleError
from modules.pipeline.local import run_single_step
from modules.storage.datasets import load_dataset
from modules.storage.model_formats import load_model, load_model_file, save_model


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def forest(digits):
    return RandomForestClassifier(n_estimators=20, random_state=0).fit(
        digits.X_train, digits.y_train
    )


@pytest.fixture(scope="module")
def forest_file(tmp_path_factory, forest):
    path = tmp_path_factory.mktemp("rf") / "rf.skops"
    path.write_bytes(save_model(ModelArtifact("sklearn", forest)))
    return path


def test_dropped_forest_has_the_requested_trees_and_the_same_classes(forest, digits):
    small, order = forest_drop_trees(forest, digits.X_train[:300], digits.y_train[:300], n_trees=5)
    assert len(small.estimators_) == small.n_estimators == 5 == len(set(order))
    assert all(small.estimators_[i] is forest.estimators_[j] for i, j in enumerate(order))
    assert np.array_equal(small.classes_, forest.classes_)
    assert set(small.predict(digits.X_test)) <= set(forest.classes_)
    assert len(forest.estimators_) == 20  # the input forest is untouched
    again = load_model(save_model(ModelArtifact("sklearn", small))).obj
    assert np.array_equal(again.predict(digits.X_test), small.predict(digits.X_test))


def test_greedy_ranking_picks_the_accurate_tree_first():
    codes = np.array([0, 1, 0, 1])
    right = np.eye(2)[codes]
    wrong = np.eye(2)[1 - codes]
    half = np.vstack([right[:2], wrong[2:]])
    probas = np.stack([wrong, half, right])  # trees: all wrong, half right, all right
    assert rank_trees_greedy(probas, codes, n_select=2)[0] == 2
    # With out-of-bag masks a tree only votes where it is unmasked.
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=bool)
    assert rank_trees_greedy(probas, codes, n_select=1, mask=mask) == [1]


@pytest.mark.parametrize("n_trees", [0, 21])
def test_tree_count_out_of_range_is_refused(forest, digits, n_trees):
    with pytest.raises(IncompatibleError, match="the forest has 20 trees"):
        forest_drop_trees(forest, digits.X_test, digits.y_test, n_trees=n_trees)


def test_depth_cut_predicts_the_class_mix_of_the_ancestor_at_that_depth(digits):
    full = DecisionTreeClassifier(random_state=0).fit(digits.X_train, digits.y_train)
    cut = prune_tree(full, max_depth=4)
    assert node_depths(cut.tree_).max() == 4 == cut.tree_.max_depth == cut.get_depth()
    assert cut.tree_.node_count < full.tree_.node_count
    depth = node_depths(full.tree_)
    path = full.decision_path(digits.X_test).toarray().astype(bool)
    # The deepest node at depth <= 4 on each sample's path holds the class mix it ends in.
    ancestor = np.array([np.flatnonzero(row & (depth <= 4))[-1] for row in path])
    values = full.tree_.value[ancestor, 0]
    expected = values / values.sum(axis=1, keepdims=True)
    assert np.allclose(cut.predict_proba(digits.X_test), expected)
    assert tree_truncate_depth(full.tree_, 1000) is full.tree_


def test_ccp_pruning_matches_fitting_with_ccp_alpha(digits):
    x, y = digits.X_train, digits.y_train
    pruned = prune_tree(DecisionTreeClassifier(random_state=0).fit(x, y), ccp_alpha=0.002)
    direct = DecisionTreeClassifier(random_state=0, ccp_alpha=0.002).fit(x, y)
    assert pruned.tree_.node_count == direct.tree_.node_count
    assert np.array_equal(pruned.predict(digits.X_test), direct.predict(digits.X_test))


def test_oob_masks_are_the_complement_of_the_bootstraps(forest, digits):
    mask = oob_masks(forest, len(digits.y_train))
    assert mask.shape == (20, len(digits.y_train))
    for t, in_bag in enumerate(forest.estimators_samples_):
        assert not mask[t, in_bag].any()
        assert mask[t].sum() == len(digits.y_train) - len(np.unique(in_bag))
    assert oob_masks(forest, 10) is None


def test_validation_is_oob_on_the_training_split_and_holdout_elsewhere(forest, digits):
    _, _, mask, how = validation_set(forest, digits, how="auto", val_fraction=0.2, seed=0)
    assert mask is not None and how.startswith("oob")
    other_split = load_dataset("digits", seed=1)
    x, _, mask, how = validation_set(forest, other_split, how="auto", val_fraction=0.2, seed=0)
    assert mask is None and how.startswith("holdout") and len(x) == 270  # ceil(0.2 * 1347)
    with pytest.raises(IncompatibleError, match="holdout"):
        validation_set(forest, other_split, how="oob", val_fraction=0.2, seed=0)
    extra = ExtraTreesClassifier(n_estimators=3, random_state=0).fit(digits.X_train, digits.y_train)
    assert validation_set(extra, digits, how="auto", val_fraction=0.2, seed=0)[2] is None


def test_sweep_reports_each_count_with_nested_greedy_sets(forest, digits):
    rows = forest_tree_sweep(
        forest,
        x_val=digits.X_train[:300],
        y_val=digits.y_train[:300],
        counts=[10, 2, 5],
        x_eval=digits.X_test,
        y_eval=digits.y_test,
        size_of=lambda f: len(save_model(ModelArtifact("sklearn", f))),
    )
    assert [r["n_trees"] for r in rows] == [2, 5, 10]
    assert rows[0]["nodes"] < rows[1]["nodes"] < rows[2]["nodes"]
    assert rows[0]["size_bytes"] < rows[2]["size_bytes"]
    first = forest_tree_sweep(
        forest, x_val=digits.X_test, y_val=digits.y_test, counts=[20], order="first"
    )
    assert first[0]["val_accuracy"] == pytest.approx(forest.score(digits.X_test, digits.y_test))
    with pytest.raises(IncompatibleError, match="1..20"):
        forest_tree_sweep(forest, x_val=digits.X_test, y_val=digits.y_test, counts=[30])


def test_step_prunes_and_reports(tmp_path, forest_file):
    out = tmp_path / "small.skops"
    record = run_single_step(
        "forest_prune",
        {"n_trees": 5, "max_depth": 8, "sweep_trees": [2, 5], "timing_runs": 2},
        input_path=forest_file,
        output_path=out,
    )
    small = load_model_file(out).obj
    m = record.metrics
    assert isinstance(small, RandomForestClassifier) and len(small.estimators_) == 5
    assert max(t.get_depth() for t in small.estimators_) <= 8
    assert m["trees_before"] == 20 and m["trees_after"] == 5 and len(m["kept_trees"]) == 5
    assert m["nodes_after"] == forest_nodes(small) < m["nodes_before"]
    assert m["validation"].startswith("oob")
    assert m["after"]["size_bytes"] == out.stat().st_size < m["before"]["size_bytes"] / 3
    assert [row["n_trees"] for row in m["sweep"]] == [2, 5]


@pytest.mark.parametrize(
    "params, error, message",
    [
        ({"n_trees": 21}, BadInputError, "asked for 21 trees but the forest has 20"),
        ({"n_trees": 0}, BadInputError, "n_trees=0"),
        ({"ccp_alpha": -0.1}, BadInputError, "ccp_alpha=-0.1"),
        (
            {"n_trees": 5, "sweep_trees": [0]},
            BadInputError,
            "sweep_trees.0=0: Input should be greater than or equal to 1",
        ),
    ],
)
def test_bad_params_are_refused(forest_file, tmp_path, params, error, message):
    out = tmp_path / "out.skops"
    with pytest.raises(error, match=message):
        run_single_step("forest_prune", params, input_path=forest_file, output_path=out)
    assert not out.exists()


def test_only_a_sweep_passes_the_forest_through(forest_file):
    record = run_single_step(
        "forest_prune",
        {"sweep_trees": [3], "timing_runs": 2},
        input_path=forest_file,
        output_path=None,
    )
    m = record.metrics
    assert m["trees_after"] == m["trees_before"] == 20 and m["nodes_after"] == m["nodes_before"]
    assert m["sweep"][0]["n_trees"] == 3


def test_wrong_model_type_and_feature_count_are_refused(tmp_path, digits, forest_file):
    knn = KNeighborsClassifier().fit(digits.X_train, digits.y_train)
    src = tmp_path / "knn.skops"
    src.write_bytes(save_model(ModelArtifact("sklearn", knn)))
    with pytest.raises(IncompatibleError, match="got KNeighborsClassifier"):
        run_single_step("forest_prune", {"n_trees": 2}, input_path=src, output_path=None)
    with pytest.raises(IncompatibleError, match="64 input features, dataset has 13"):
        run_single_step(
            "forest_prune", {"n_trees": 2}, input_path=forest_file, output_path=None, dataset="wine"
        )
