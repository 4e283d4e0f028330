import numpy as np
import pytest
from sklearn.ensemble import RandomForestClassifier
from sklearn.feature_selection import SelectKBest, VarianceThreshold
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline

from modules.compression.feature_prune import (
    coef_prune,
    feature_select,
    kept_features,
    variance_selector,
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
def crafted():
    """Feature 0 decides the label; 1 is loud noise; 2 is quiet noise; 3 is constant."""
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 100)
    x = np.column_stack(
        [
            y + rng.normal(0, 0.05, 200),
            rng.normal(0, 3.0, 200),
            rng.normal(0, 0.01, 200),
            np.ones(200),
        ]
    ).astype(np.float32)
    return x, y


@pytest.mark.parametrize("method", ["variance", "importance", "mutual_info"])
def test_pruned_pipeline_accepts_original_shape_input(method, digits):
    knn = KNeighborsClassifier().fit(digits.X_train, digits.y_train)
    pipe = feature_select(knn, digits.X_train, digits.y_train, method=method, keep_ratio=0.25)
    assert isinstance(pipe, Pipeline) and pipe.named_steps["model"].n_features_in_ == 16
    assert len(kept_features(pipe)) == 16
    assert pipe.predict(digits.X_test).shape == (len(digits.y_test),)
    assert pipe.score(digits.X_test, digits.y_test) > 0.85
    loaded = load_model(save_model(ModelArtifact("sklearn", pipe))).obj  # allow-listed types only
    assert np.array_equal(loaded.predict(digits.X_test), pipe.predict(digits.X_test))


def test_variance_keeps_the_loudest_features_and_drops_constants(crafted):
    x, _ = crafted
    selector = variance_selector(x, keep=2)
    assert isinstance(selector, VarianceThreshold)
    assert selector.get_support().tolist() == [True, True, False, False]
    assert variance_selector(x, keep=4).get_support().tolist() == [True, True, True, False]


def test_variance_ties_at_the_cut_keep_every_tied_feature():
    x = np.array([[0, 0, 0], [2, 2, 1], [0, 0, 0], [2, 2, 1]], dtype=np.float32)
    assert variance_selector(x, keep=1).get_support().tolist() == [True, True, False]


def test_mutual_info_and_importance_find_the_informative_feature(crafted):
    x, y = crafted
    for method in ("mutual_info", "importance"):
        model = LogisticRegression().fit(x, y)
        pipe = feature_select(model, x, y, method=method, keep_ratio=0.25)
        assert kept_features(pipe).tolist() == [0], method
        assert isinstance(pipe.named_steps["select"], SelectKBest)
        assert pipe.score(x, y) > 0.99


def test_importance_uses_a_forests_own_importances(crafted):
    x, y = crafted
    forest = RandomForestClassifier(n_estimators=10, random_state=0).fit(x, y)
    pipe = feature_select(forest, x, y, method="importance", keep_ratio=0.5)
    assert np.array_equal(pipe.named_steps["select"].scores_, forest.feature_importances_)


def test_coef_magnitude_zeroes_the_smallest_weights(digits):
    model = LogisticRegression(max_iter=500).fit(digits.X_train, digits.y_train)
    pruned = coef_prune(model, keep_ratio=0.25)
    assert type(pruned) is LogisticRegression and pruned is not model
    kept = np.count_nonzero(pruned.coef_)
    assert kept == round(0.25 * model.coef_.size)
    smallest_kept = np.abs(pruned.coef_[pruned.coef_ != 0]).min()
    assert smallest_kept >= np.sort(np.abs(model.coef_).ravel())[::-1][kept - 1]
    assert np.count_nonzero(model.coef_) > kept  # the input is untouched
    with pytest.raises(IncompatibleError, match="needs a linear model with coef_"):
        coef_prune(KNeighborsClassifier().fit(digits.X_train, digits.y_train), keep_ratio=0.5)


def test_step_writes_a_pipeline_and_reports(tmp_path, digits):
    src = tmp_path / "knn.skops"
    knn = KNeighborsClassifier().fit(digits.X_train, digits.y_train)
    src.write_bytes(save_model(ModelArtifact("sklearn", knn)))
    out = tmp_path / "pruned.skops"
    record = run_single_step(
        "feature_prune",
        {"method": "variance", "keep_ratio": 0.5, "timing_runs": 2},
        input_path=src,
        output_path=out,
    )
    model = load_model_file(out).obj
    m = record.metrics
    assert isinstance(model, Pipeline) and m["features_kept"] == 32 == model[-1].n_features_in_
    assert m["kept_feature_indices"] == kept_features(model).tolist()
    assert m["after"]["accuracy"] == pytest.approx(model.score(digits.X_test, digits.y_test))
    with pytest.raises(BadInputError, match="keep_ratio=0"):
        run_single_step("feature_prune", {"keep_ratio": 0}, input_path=src, output_path=None)
    with pytest.raises(IncompatibleError, match="coef_"):
        run_single_step(
            "feature_prune", {"method": "coef_magnitude"}, input_path=src, output_path=None
        )
