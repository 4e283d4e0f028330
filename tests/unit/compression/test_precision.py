import numpy as np
import pytest
import skops.io as sio
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer
from sklearn.svm import SVC
from sklearn.tree import DecisionTreeClassifier

from modules.compression.precision import (
    agreement,
    input_quantizer,
    precision_pathway,
    precision_report,
    quantized_bytes,
)
from modules.core.artifact import ModelArtifact
from modules.errors import IncompatibleError, UnsafeModelError
from modules.pipeline.local import run_single_step
from modules.storage.datasets import load_dataset
from modules.storage.model_formats import load_model, load_model_file, save_model


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_agreement_counts_matching_labels():
    assert agreement(np.array([1, 2, 3, 4]), np.array([1, 2, 0, 4])) == 0.75
    with pytest.raises(ValueError, match="shapes"):
        agreement(np.array([1, 2]), np.array([1, 2, 3]))


def test_agreement_on_a_crafted_split_that_quantization_flips():
    # One split at 0.5001 on a feature ranging over [0, 1]: the int8 grid has an edge at 0.5 and
    # float16 rounds 0.5001 to 0.5, so only x = 0.50005 changes side on those pathways.
    x = np.array([[0.0], [0.5], [0.5002], [1.0]], dtype=np.float32)
    tree = DecisionTreeClassifier().fit(x, [0, 0, 1, 1])
    x_eval = np.array([[0.1], [0.50005], [0.9], [0.3]], dtype=np.float32)
    report = precision_report(tree, x_calib=x, x_eval=x_eval, y_eval=np.array([0, 0, 1, 0]))
    assert report["float32"]["agreement_with_float32"] == 1.0
    assert report["float32"]["accuracy"] == 1.0
    assert report["int8"]["agreement_with_float32"] == 0.75
    assert report["float16"]["agreement_with_float32"] == 0.75
    assert report["int8"]["accuracy"] == 0.75
    assert report["int8"]["quantized"]["bytes"] == 1 + 8  # one threshold + one feature's grid
    assert precision_pathway(tree, "int8", x).predict(x_eval).tolist() == [0, 1, 1, 0]


def test_input_quantizer_rounds_to_256_levels_and_keeps_constants():
    rng = np.random.default_rng(0)
    x = np.column_stack([rng.uniform(-2, 6, 500), np.full(500, 3.0)]).astype(np.float32)
    deq = Pipeline(input_quantizer(x)).transform(x)
    width = 8 / 256
    assert np.abs(deq[:, 0] - x[:, 0]).max() <= width / 2 + 1e-3
    assert len(np.unique(deq[:, 0])) <= 256 and np.allclose(deq[:, 1], 3.0)
    outside = Pipeline(input_quantizer(x)).transform(np.array([[100, 3]], dtype=np.float32))
    assert outside[0, 0] == pytest.approx(x[:, 0].max() - width / 2, abs=1e-3)  # clipped


def test_int8_trees_decide_like_the_tree_on_quantized_inputs(digits):
    forest = RandomForestClassifier(n_estimators=10, random_state=0)
    forest.fit(digits.X_train, digits.y_train)
    before = forest.estimators_[0].tree_.threshold.copy()
    int8 = precision_pathway(forest, "int8", digits.X_train)
    assert not isinstance(int8, Pipeline)  # thresholds baked in: no extra step at inference
    rng = np.random.default_rng(1)
    x = rng.uniform(-0.2, 1.2, size=(500, 64)).astype(np.float32)
    dequantized = Pipeline(input_quantizer(digits.X_train)).transform(x)
    assert np.array_equal(int8.predict(x), forest.predict(dequantized))
    assert np.array_equal(forest.estimators_[0].tree_.threshold, before)  # input untouched
    assert not np.array_equal(int8.estimators_[0].tree_.threshold, before)


def test_int8_knn_stores_points_on_the_grid_and_quantizes_inputs(digits):
    knn = KNeighborsClassifier(n_neighbors=3).fit(digits.X_train[:200], digits.y_train[:200])
    pipe = precision_pathway(knn, "int8", digits.X_train)
    assert [name for name, _ in pipe.steps] == ["quantize", "dequantize", "model"]
    grid = pipe[:-1].transform(knn._fit_X)
    assert np.array_equal(pipe[-1]._fit_X, grid) and pipe[-1].n_neighbors == 3
    assert quantized_bytes(knn, "int8")["bytes"] == 200 * 64 + 8 * 64
    assert quantized_bytes(knn, "float16")["bytes"] == 200 * 64 * 2


def test_float16_linear_weights_are_rounded_and_int8_is_per_class_symmetric(digits):
    model = LogisticRegression(max_iter=300).fit(digits.X_train, digits.y_train)
    half = precision_pathway(model, "float16", digits.X_train)
    assert np.array_equal(half.coef_, model.coef_.astype(np.float16).astype(model.coef_.dtype))
    int8 = precision_pathway(model, "int8", digits.X_train)[-1]
    steps = np.abs(int8.coef_) / (np.abs(model.coef_).max(axis=1, keepdims=True) / 127)
    assert np.allclose(steps, np.round(steps), atol=1e-4) and steps.max() <= 127 + 1e-4


def test_a_pipeline_keeps_its_head_and_calibrates_after_it(digits):
    from modules.compression.feature_prune import feature_select

    knn = KNeighborsClassifier().fit(digits.X_train, digits.y_train)
    pipe = feature_select(knn, digits.X_train, digits.y_train, method="variance", keep_ratio=0.5)
    int8 = precision_pathway(pipe, "int8", digits.X_train)
    assert [name for name, _ in int8.steps] == ["select", "quantize", "dequantize", "model"]
    assert int8.predict(digits.X_test).shape == digits.y_test.shape
    assert int8[1].n_features_in_ == 32


def test_unsupported_models_are_refused(digits):
    svc = SVC().fit(digits.X_train[:100], digits.y_train[:100])
    with pytest.raises(IncompatibleError, match="precision supports .* got SVC"):
        precision_pathway(svc, "int8", digits.X_train)


def test_every_pathway_saves_and_loads_through_the_allow_list(digits):
    knn = KNeighborsClassifier().fit(digits.X_train[:100], digits.y_train[:100])
    for dtype in ("float32", "float16", "int8"):
        model = precision_pathway(knn, dtype, digits.X_train)
        loaded = load_model(save_model(ModelArtifact("sklearn", model))).obj
        assert np.array_equal(loaded.predict(digits.X_test), model.predict(digits.X_test))


def _shift_inputs(x):
    """Stands in for arbitrary code a crafted skops file would make the loader import."""
    return x + 1


def test_a_skops_file_with_an_untrusted_type_is_refused(digits):
    pipe = Pipeline(
        [("f", FunctionTransformer(_shift_inputs)), ("m", KNeighborsClassifier(n_neighbors=1))]
    ).fit(digits.X_train[:50], digits.y_train[:50])
    with pytest.raises(UnsafeModelError, match=r"outside the trusted list: .*_shift_inputs"):
        load_model(sio.dumps(pipe), filename="model.skops")


def test_step_reports_every_pathway(tmp_path, digits):
    src = tmp_path / "knn.skops"
    knn = KNeighborsClassifier().fit(digits.X_train, digits.y_train)
    src.write_bytes(save_model(ModelArtifact("sklearn", knn)))
    out = tmp_path / "int8.skops"
    record = run_single_step(
        "precision", {"dtype": "int8", "timing_runs": 2}, input_path=src, output_path=out
    )
    m = record.metrics
    assert set(m["pathways"]) == {"float32", "float16", "int8"}
    assert m["pathways"]["float32"]["agreement_with_float32"] == 1.0
    sizes = [m["pathways"][d]["quantized"]["bytes"] for d in ("float32", "float16", "int8")]
    assert sizes[0] == 2 * sizes[1] and sizes[2] < sizes[1]
    model = load_model_file(out).obj
    assert isinstance(model, Pipeline)
    assert m["after"]["accuracy"] == pytest.approx(model.score(digits.X_test, digits.y_test))
    assert m["agreement_with_float32"] == m["pathways"]["int8"]["agreement_with_float32"]
