from modules.evaluation.measure import MeasureParams, count_params, inference_memory, measure
from modules.evaluation.repeat import seed_schedule


def test_measure_repeats_summarize_each_metric_on_the_seed_schedule(small_mlp, digits, ctx_factory):
    ctx = ctx_factory(repeats=3, seed=4)
    m = measure(small_mlp, digits, MeasureParams(runs=3, warmup=1), ctx).metrics
    repeats = m["repeats"]
    assert repeats["n"] == 3 and repeats["seeds"] == seed_schedule(4, 3)
    for key in (
        "accuracy",
        "size_bytes",
        "latency_ms.b1",
        "throughput_per_s.b64",
        "energy_mj_estimate",
    ):
        stat = repeats["metrics"][key]
        assert stat["n"] == 3 and stat["ci95"][0] <= stat["mean"] <= stat["ci95"][1]
    # The same model measured three times: accuracy and size do not vary.
    assert repeats["metrics"]["accuracy"]["std"] == 0
    assert m["latency_median_over_repeats_ms"]["b1"]["n"] == 3
    assert m["latency_median_over_repeats_ms"]["b1"]["unit"] == "ms"


def test_knn_counts_its_stored_samples(small_knn, digits):
    # KNN keeps the training set in private attributes (_fit_X, _y): those are the model.
    n_train = len(digits.y_train)
    total, _ = count_params(small_knn)
    assert total == n_train * digits.n_features + n_train + digits.n_classes
    model_bytes = inference_memory(small_knn, digits.X_test[:1])["model_bytes"]
    assert model_bytes >= n_train * digits.n_features * 4


def test_kd_tree_arrays_count_too(digits):
    from sklearn.neighbors import KNeighborsClassifier

    from modules.core.artifact import ModelArtifact

    tree = KNeighborsClassifier(algorithm="kd_tree").fit(digits.X_train, digits.y_train)
    brute = KNeighborsClassifier(algorithm="brute").fit(digits.X_train, digits.y_train)
    # The tree holds its own copy of the samples plus its index and node arrays.
    extra = (
        count_params(ModelArtifact("sklearn", tree))[0]
        - count_params(ModelArtifact("sklearn", brute))[0]
    )
    assert extra >= len(digits.y_train) * digits.n_features
