import numpy as np
import pytest
from sklearn.ensemble import RandomForestClassifier
from sklearn.neighbors import KNeighborsClassifier

from modules.compression.knn_prototypes import (
    knn_condense,
    knn_edit,
    knn_kmeans_prototypes,
    knn_reduce,
    prototype_counts,
    search_ratio,
)
from modules.core.artifact import ModelArtifact
from modules.errors import BadInputError, IncompatibleError
from modules.pipeline.local import run_single_step
from modules.storage.datasets import load_dataset
from modules.storage.model_formats import load_model_file, save_model


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def knn_file(tmp_path_factory, digits):
    path = tmp_path_factory.mktemp("knn") / "knn.skops"
    knn = KNeighborsClassifier(n_neighbors=5).fit(digits.X_train, digits.y_train)
    path.write_bytes(save_model(ModelArtifact("sklearn", knn)))
    return path


def test_condensed_set_classifies_every_absorbed_point(digits):
    x, y = digits.X_train[:600], digits.y_train[:600]
    order = knn_condense(x, y, seed=3)
    assert len(set(order.tolist())) == len(order) < len(y) // 3
    assert set(y[order[:10]].tolist()) == set(range(10))  # one seed point per class first
    absorbed = np.setdiff1d(np.arange(len(y)), order)
    # kd_tree computes exact differences, so ties stay ties; Hart's set must win them all.
    one_nn = KNeighborsClassifier(n_neighbors=1, algorithm="kd_tree").fit(x[order], y[order])
    assert (one_nn.predict(x[absorbed]) == y[absorbed]).all()


def test_condensing_is_deterministic_per_seed(digits):
    x, y = digits.X_train[:300], digits.y_train[:300]
    assert np.array_equal(knn_condense(x, y, seed=1), knn_condense(x, y, seed=1))


def test_wilson_editing_drops_a_planted_mislabel_but_never_a_whole_class():
    rng = np.random.default_rng(0)
    x = np.vstack([rng.normal(0, 0.1, (20, 2)), rng.normal(5, 0.1, (20, 2)), [[0.0, 0.0]]])
    y = np.array([0] * 20 + [1] * 20 + [1])  # the last point sits in class 0's cluster
    kept = knn_edit(x, y, k=3)
    assert 40 not in kept and len(kept) == 40
    lonely = knn_edit(np.array([[0.0], [0.1], [0.2], [5.0]]), np.array([0, 0, 0, 1]), k=3)
    assert 3 in lonely  # editing would empty class 1: it stays


def test_kmeans_prototypes_have_the_requested_count_per_class(digits):
    x, y = digits.X_train, digits.y_train
    px, py = knn_kmeans_prototypes(x, y, ratio=0.1, seed=0, n_init=1)
    want = prototype_counts(y, ratio=0.1)
    got = dict(zip(*np.unique(py, return_counts=True), strict=True))
    assert {int(k): int(v) for k, v in got.items()} == want
    assert px.shape == (sum(want.values()), 64) and px.dtype == x.dtype
    assert want[0] == round(0.1 * (y == 0).sum())


def test_ratio_caps_the_condensed_set_per_class(digits):
    x, y = digits.X_train, digits.y_train
    _, natural, info = knn_reduce(x, y, method="condensed", ratio=None)
    _, capped, capped_info = knn_reduce(x, y, method="condensed", ratio=0.03)
    assert len(natural) == info["natural_prototypes"] and capped_info["capped"] is True
    counts = np.bincount(capped, minlength=10)
    assert (counts <= np.array(list(prototype_counts(y, ratio=0.03).values()))).all()
    assert len(capped) < len(natural)


def test_tolerance_search_returns_the_smallest_ratio_within_tolerance(digits):
    knn = KNeighborsClassifier(n_neighbors=5).fit(digits.X_train, digits.y_train)
    ratio, table = search_ratio(
        knn,
        digits.X_train,
        digits.y_train,
        method="kmeans",
        ratios=[0.3, 0.01, 0.05, 0.1],
        tolerance=0.02,
        val_fraction=0.2,
        n_neighbors=1,
    )
    rows = table[1:]
    assert [r["ratio"] for r in rows] == sorted(r["ratio"] for r in rows)
    assert rows[-1]["ratio"] == ratio and rows[-1]["within_tolerance"]
    assert not any(r["within_tolerance"] for r in rows[:-1])
    reference = table[0]["reference_val_accuracy"]
    assert reference - rows[-1]["val_accuracy"] <= 0.02
    # Prototypes come from the 80% of the stored points left after carving the validation split.
    assert rows[0]["prototypes"] == 10 and rows[-1]["prototypes"] < 0.8 * 1347 * ratio + 10


def test_step_returns_a_smaller_knn_and_reports_it(tmp_path, knn_file):
    out = tmp_path / "small.skops"
    record = run_single_step(
        "knn_prototypes",
        {"method": "kmeans", "ratio": 0.1, "timing_runs": 2},
        input_path=knn_file,
        output_path=out,
    )
    small = load_model_file(out).obj
    m = record.metrics
    assert isinstance(small, KNeighborsClassifier) and small.n_neighbors == 1
    assert m["prototypes_before"] == 1347 and m["prototypes_after"] == len(small._fit_X) < 140
    assert m["stored_bytes_after"] < m["stored_bytes_before"] / 9
    assert m["after"]["size_bytes"] == out.stat().st_size
    assert {"b1", "b450"} <= set(m["after"]["latency_ms"])
    assert m["after"]["accuracy"] > 0.9


def test_tolerance_mode_through_the_step(tmp_path, knn_file):
    record = run_single_step(
        "knn_prototypes",
        {"method": "kmeans", "tolerance_pts": 1.0, "search_ratios": [0.05, 0.2], "timing_runs": 2},
        input_path=knn_file,
        output_path=None,
    )
    m = record.metrics
    assert m["ratio"] in (0.05, 0.2, None) and "search" in m
    if m["within_tolerance"]:
        assert m["kept_fraction"] <= m["ratio"] + 0.01


def test_a_forest_is_refused_and_nothing_written(tmp_path, digits):
    rf = RandomForestClassifier(n_estimators=3, random_state=0).fit(digits.X_train, digits.y_train)
    src = tmp_path / "rf.skops"
    src.write_bytes(save_model(ModelArtifact("sklearn", rf)))
    out = tmp_path / "out.skops"
    with pytest.raises(IncompatibleError, match="needs a KNeighborsClassifier, got Random"):
        run_single_step("knn_prototypes", {"ratio": 0.1}, input_path=src, output_path=out)
    assert not out.exists()


def test_feature_count_mismatch_is_refused(knn_file):
    with pytest.raises(IncompatibleError, match="64 input features, dataset has 4"):
        run_single_step(
            "knn_prototypes", {"ratio": 0.1}, input_path=knn_file, output_path=None, dataset="iris"
        )


@pytest.mark.parametrize(
    "params, message",
    [
        ({"ratio": 0}, "greater than 0"),
        ({"ratio": 1.5}, "less than or equal to 1"),
        ({"ratio": 0.1, "tolerance_pts": 1}, "not both"),
        (
            {"tolerance_pts": 1, "search_ratios": [0.1, 2]},
            "search_ratios.1=2: Input should be less than or equal to 1",
        ),
    ],
)
def test_bad_params_name_the_problem(params, message, knn_file):
    with pytest.raises(BadInputError, match=message):
        run_single_step("knn_prototypes", params, input_path=knn_file, output_path=None)


def test_too_few_prototypes_for_k_is_refused(knn_file):
    with pytest.raises(IncompatibleError, match="n_neighbors=50 but only"):
        run_single_step(
            "knn_prototypes",
            {"method": "kmeans", "ratio": 0.01, "n_neighbors": 50},
            input_path=knn_file,
            output_path=None,
        )


def test_the_default_is_kmeans_at_a_tenth_of_the_points():
    from modules.compression.knn_prototypes import DEFAULT_KMEANS_RATIO, KnnPrototypesParams

    params = KnnPrototypesParams()
    assert params.method == "kmeans" and params.ratio == DEFAULT_KMEANS_RATIO == 0.1
    assert KnnPrototypesParams(tolerance_pts=1.0).ratio is None  # the search picks the ratio
    assert KnnPrototypesParams(method="condensed").ratio is None  # its natural size
