"""The accuracy-aware int8 search: grid, sensitivity probes, node exclusion, best-so-far."""

from __future__ import annotations

import io
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from modules.core.artifact import ModelArtifact
from modules.deployment.onnx_export import OnnxExportParams, export_model
from modules.deployment.onnx_quantize import OnnxQuantizeParams, onnx_quantize
from modules.deployment.onnx_search import (
    SearchBudget,
    grid_settings,
    search_int8,
    transformer_like,
)
from modules.deployment.parity_metrics import cosine_rows
from modules.errors import IncompatibleError
from modules.evaluation.inference import OrtRunner
from modules.storage.artifacts import LocalStore
from modules.storage.keys import inputs_key
from modules.storage.model_formats import load_model, save_model
from tests.text_encoder import text_encoder, text_encoder_inputs, text_encoder_onnx

# speed_band=None: the base setting is chosen by parity alone, so the outcome does not
# depend on how fast each trial happened to run on a loaded machine.
QUICK = SearchBudget(latency_runs=2, latency_batch=8, speed_band=None)
QUICK_PARAMS = {"search": True, "latency_runs": 2, "latency_batch": 8}


def fragile_graph() -> onnx.ModelProto:
    """features (batch, 16) -> MatMul `benign` -> Relu -> MatMul `fragile` -> embedding (8).

    `fragile` has a row of 1000s that meets a unit which is always 0 (its weights and bias
    keep it negative before the Relu): no effect in float, but every int8 scale of that
    node is set by the 1000s, so its real weights all round to zero, per tensor or per
    channel alike.
    """
    rng = np.random.default_rng(0)
    w_a = (rng.normal(size=(16, 32)) * 0.3).astype(np.float32)
    w_a[:, 0] = 0.0
    b_a = np.zeros(32, np.float32)
    b_a[0] = -1.0
    w_b = rng.normal(size=(32, 8)).astype(np.float32)
    w_b[0, :] = 1000.0
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["features", "w_a"], ["a"], name="benign"),
            helper.make_node("Add", ["a", "b_a"], ["a_b"], name="bias"),
            helper.make_node("Relu", ["a_b"], ["h"], name="relu"),
            helper.make_node("MatMul", ["h", "w_b"], ["embedding"], name="fragile"),
        ],
        "fragile",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 8])],
        [numpy_helper.from_array(a, n) for a, n in ((w_a, "w_a"), (b_a, "b_a"), (w_b, "w_b"))],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(proto)
    return proto


def features(rows: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    x = np.random.default_rng(seed).normal(size=(rows, 16)).astype(np.float32)
    return {"features": x}


def calibration() -> list[dict[str, np.ndarray]]:
    x = features(32, seed=1)["features"]
    return [{"features": x[:16]}, {"features": x[16:]}]


def test_the_grid_covers_modes_scales_ranges_formats_and_types():
    grid = grid_settings(static=True)
    assert len(grid) == 15 == len({s.as_dict().__repr__() for s in grid})
    assert {s.mode for s in grid} == {"dynamic", "static"}
    static = [s for s in grid if s.mode == "static"]
    assert {s.quant_format for s in static} == {"qoperator", "qdq"}
    assert {(s.activation_type, s.weight_type) for s in static} == {
        ("uint8", "int8"),
        ("uint8", "uint8"),
        ("int8", "int8"),
    }
    # Static U8S8 in QOperator format, per tensor and per channel, is tried first.
    first = [(s.mode, s.quant_format, s.activation_type, s.per_channel) for s in grid[:2]]
    assert first == [
        ("static", "qoperator", "uint8", False),
        ("static", "qoperator", "uint8", True),
    ]
    assert not any(s.smooth_alpha for s in grid)
    assert len(grid_settings(static=False)) == 8
    assert all(s.mode == "dynamic" for s in grid_settings(static=False, transformer_like=True))


def test_transformer_like_graphs_add_smoothquant_candidates():
    grid = grid_settings(static=True, transformer_like=True)
    smooth = [s for s in grid if s.smooth_alpha is not None]
    assert [(s.mode, s.smooth_alpha) for s in smooth] == [("static", 0.5), ("dynamic", 0.5)]
    assert len(grid) == 17 and grid.index(smooth[0]) < 6  # before the long tail
    encoder = text_encoder(vocab_size=50, dim=16, heads=2, layers=1, ff_dim=32, max_len=8)
    assert transformer_like(onnx.load_model_from_string(text_encoder_onnx(encoder)))
    assert not transformer_like(fragile_graph())


def test_the_search_excludes_the_fragile_node_and_then_passes(tmp_path):
    proto = fragile_graph()
    result = search_int8(
        proto,
        feeds=features(),
        calibration=calibration(),
        thresholds=OnnxQuantizeParams(),
        meta={},
        workdir=tmp_path,
        budget=QUICK,
    )
    grid = [t for t in result.trials if t["phase"] == "grid"]
    assert len(grid) == 15 and not any(t["passed"] for t in grid)
    # One sensitivity pass ranks both nodes; it is recorded and never a candidate. Units are
    # named as in the pre-processed graph, where `benign` + `bias` became a Gemm.
    (sensitivity,) = [t for t in result.trials if t["phase"] == "sensitivity"]
    assert not sensitivity["candidate"] and sensitivity["granularity"] == "node"
    ranking = [(r["unit"].split("/")[0], r["damage"]) for r in sensitivity["ranking"]]
    assert [name for name, _ in ranking] == ["fragile", "benign"]
    assert ranking[0][1] > 0.5 > 0.05 > ranking[1][1]
    assert result.verdict.passed, result.verdict.reason
    assert result.stop_reason == "cannot_beat_best" and "stopped:" in result.verdict.reason
    assert result.chosen["phase"] == "exclude" and result.chosen["chosen"] is True
    assert result.chosen["settings"]["nodes_to_exclude"] == ["fragile"]
    assert result.kind == "embedding" and "int8 search chose" in result.verdict.reason
    for trial in result.trials:  # every candidate: settings, size, parity and latency
        if not trial["candidate"]:
            continue
        assert {"settings", "size_bytes", "parity", "latency_ms", "passed"} <= set(trial)
    # Compaction clears node names but for the nodes left in float, which stay findable.
    named = {n.name: n.op_type for n in result.model.graph.node if n.name}
    assert named == {"fragile": "MatMul"}
    assert "MatMulInteger" in {n.op_type for n in result.model.graph.node}
    ref = OrtRunner.of(proto, threads=1).run(features(seed=5))["embedding"]
    out = OrtRunner.of(result.model, threads=1).run(features(seed=5))["embedding"]
    assert cosine_rows(ref, out).min() >= 0.99


def test_an_impossible_threshold_returns_the_best_so_far_with_the_reason(tmp_path):
    impossible = OnnxQuantizeParams(min_cosine=1.0, max_abs_error=0.0)
    result = search_int8(
        fragile_graph(),
        feeds=features(),
        calibration=None,
        thresholds=impossible,
        meta={},
        workdir=tmp_path,
        budget=QUICK,
    )
    assert result.model is not None and result.chosen is not None
    assert not result.verdict.passed
    reason = result.verdict.reason
    assert "no setting passed the embedding parity gate" in reason and "best so far" in reason
    assert "max abs error" in reason and "> max 0" in reason
    best = max((t for t in result.trials if t["candidate"]), key=lambda t: t["score"])
    assert result.chosen["trial"] == best["trial"]
    assert result.stop_reason == "exclusion_cap" and "still failing" in result.stopped
    assert result.model.ByteSize() == result.chosen["size_bytes"]


def test_the_trial_budget_stops_the_search_and_says_so(tmp_path):
    result = search_int8(
        fragile_graph(),
        feeds=features(),
        calibration=None,
        thresholds=OnnxQuantizeParams(),
        meta={},
        workdir=tmp_path,
        budget=SearchBudget(latency_runs=2, latency_batch=8, max_trials=3),
    )
    assert len(result.trials) == 3 and result.stopped == "max_trials (3) reached"
    assert result.stop_reason == "max_trials"
    assert not result.verdict.passed and "max_trials (3) reached" in result.verdict.reason


def test_a_spent_time_budget_stops_the_search_and_says_so(tmp_path):
    result = search_int8(
        fragile_graph(),
        feeds=features(),
        calibration=None,
        thresholds=OnnxQuantizeParams(),
        meta={},
        workdir=tmp_path,
        budget=SearchBudget(latency_runs=2, latency_batch=8, max_seconds=0.0),
    )
    assert result.trials == [] and result.model is None
    assert result.stop_reason == "time_budget" and "time budget (0 s) spent" in result.stopped
    assert "time budget" in result.verdict.reason


def chain_graph(
    depth: int = 12, fragile: tuple[int, ...] = (7,), width: int = 64
) -> onnx.ModelProto:
    """features (batch, 16) -> `depth` x (MatMul `layer{i}` -> Add -> Relu) -> embedding.

    For each f in `fragile`, layer f-1 keeps its unit 0 dead (zero weights, negative bias)
    and layer f reads that unit with weights of 1000: harmless in float, ruinous in int8 (as
    in fragile_graph).
    """
    rng = np.random.default_rng(3)
    nodes, inits, x = [], [], "features"
    for i in range(depth):
        fan_in = 16 if i == 0 else width
        w = (rng.normal(size=(fan_in, width)) * np.sqrt(2 / fan_in)).astype(np.float32)
        b = np.full(width, 0.1, np.float32)
        if i + 1 in fragile:
            w[:, 0], b[0] = 0.0, -1.0
        if i in fragile:
            w[0, :] = 1000.0
        out = "embedding" if i == depth - 1 else f"h{i}"
        nodes += [
            helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"layer{i}"),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}" if i < depth - 1 else out]),
        ]
        if i < depth - 1:
            nodes.append(helper.make_node("Relu", [f"a{i}"], [out]))
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        x = out
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", width])],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(proto)
    return proto


def test_bisection_finds_a_planted_fragile_node_in_fewer_trials_than_nodes(tmp_path):
    result = search_int8(
        chain_graph(),
        feeds=features(),
        calibration=None,
        thresholds=OnnxQuantizeParams(),
        meta={},
        workdir=tmp_path,
        budget=QUICK,
    )
    assert result.verdict.passed, result.verdict.reason
    excluded = result.chosen["settings"]["nodes_to_exclude"]
    assert [name.split("/")[0] for name in excluded] == ["layer7"]
    after_grid = [t for t in result.trials if t["phase"] != "grid"]
    # One sensitivity pass, then the lone culprit in float passes at once: 2 trials, not 12.
    assert len(after_grid) < 12 and after_grid[0]["phase"] == "sensitivity"
    assert after_grid[0]["ranking"][0]["unit"].startswith("layer7")
    assert [t["units_in_float"] for t in after_grid[1:]] == [1]
    assert result.stop_reason == "cannot_beat_best"


def test_several_culprits_are_found_by_galloping_then_bisecting(tmp_path):
    result = search_int8(
        chain_graph(fragile=(3, 7, 10)),
        feeds=features(),
        calibration=None,
        thresholds=OnnxQuantizeParams(),
        meta={},
        workdir=tmp_path,
        budget=QUICK,
    )
    assert result.verdict.passed, result.verdict.reason
    excluded = sorted(name.split("/")[0] for name in result.chosen["settings"]["nodes_to_exclude"])
    assert excluded == ["layer10", "layer3", "layer7"]
    tried = [t["units_in_float"] for t in result.trials if t["phase"] == "exclude"]
    assert tried == [1, 2, 4, 3] and result.stop_reason == "cannot_beat_best"
    assert "3 unit(s) in float pass and 2 fail" in result.stopped


def test_every_trial_reports_progress(tmp_path):
    seen: list[dict] = []
    result = search_int8(
        fragile_graph(),
        feeds=features(),
        calibration=None,
        thresholds=OnnxQuantizeParams(),
        meta={},
        workdir=tmp_path,
        budget=QUICK,
        progress=seen.append,
    )
    assert [p["trial"] for p in seen] == list(range(1, len(result.trials) + 1))
    assert [p["phase"] for p in seen] == [t["phase"] for t in result.trials]
    assert seen[-1]["passed"] and seen[-1]["best_passing_size_bytes"] == result.chosen["size_bytes"]


def outlier_features(rows: int, *, seed: int) -> dict[str, np.ndarray]:
    """Rows whose first four features are 40x larger in every other row."""
    x = features(rows, seed=seed)["features"]
    x[::2, :4] *= 40.0
    return {"features": x}


def test_a_candidate_that_passes_only_on_its_calibration_rows_is_not_chosen(tmp_path):
    """Static int8 calibrated on ordinary rows clips the held-out rows' large features."""
    calibrated = features(32, seed=1)
    common = {
        "calibration": [calibrated],
        "thresholds": OnnxQuantizeParams(),
        "meta": {},
        "budget": QUICK,
    }
    proto = chain_graph(depth=2, fragile=())  # two plain layers
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    on_calibration = search_int8(proto, feeds=calibrated, workdir=tmp_path / "a", **common)
    static = lambda r: [t for t in r.trials if t["settings"]["mode"] == "static"]  # noqa: E731
    assert all(t["passed"] for t in static(on_calibration))  # the planted candidates
    held_out = search_int8(
        proto, feeds=outlier_features(32, seed=2), workdir=tmp_path / "b", **common
    )
    assert static(held_out) and not any(t["passed"] for t in static(held_out))
    assert held_out.verdict.passed and held_out.chosen["settings"]["mode"] == "dynamic"


def test_type_variants_of_a_passing_setting_are_skipped_and_listed(tmp_path):
    """Weight/activation types and reduce_range change no byte: once one passes, the rest wait."""
    rows = features(32, seed=1)
    result = search_int8(
        chain_graph(depth=2, fragile=()),
        feeds=rows,
        calibration=[rows],
        thresholds=OnnxQuantizeParams(),
        meta={},
        workdir=tmp_path,
        budget=QUICK,
    )
    assert result.verdict.passed and result.skipped
    run = {t["label"] for t in result.trials}
    by_trial = {t["trial"]: t for t in result.trials}
    for skip in result.skipped:
        assert skip["label"] not in run
        twin = by_trial[skip["as"]]
        assert twin["passed"]
        same = ("mode", "quant_format", "per_channel")
        assert all(twin["settings"].get(k) == skip["settings"].get(k) for k in same)
    # Every size class of the grid ran at least once; only same-bytes variants were skipped.
    grid = grid_settings(static=True)
    assert len(result.trials) + len(result.skipped) == len(grid)


# --- the step ---------------------------------------------------------------------------------


def with_inputs(ctx, tmp_path, arrays: dict[str, np.ndarray], inputs_id: str = "feats"):
    store = LocalStore(tmp_path / "store")
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    store.put_bytes(inputs_key(ctx.user_id, inputs_id), buf.getvalue())
    ctx.read_bytes = store.get_bytes
    return ctx


def test_the_step_searches_on_an_inputs_file_and_stores_every_trial(digits, ctx_factory, tmp_path):
    ctx = with_inputs(ctx_factory(), tmp_path, features())
    params = OnnxQuantizeParams(inputs="feats", **QUICK_PARAMS)
    out = onnx_quantize(ModelArtifact("onnx", fragile_graph(), {}), digits, params, ctx)
    assert out.verdict.passed, out.verdict.reason
    m = out.metrics
    # Half the file's rows are held out to score on; the other half calibrates.
    assert m["kind"] == "embedding"
    assert m["inputs"] == {"inputs": "feats", "rows": 32, "held_out_of": 64}
    assert m["calibration"]["inputs"] == "feats" and m["calibration"]["rows"] == 32
    assert "does not score on" in m["calibration"]["note"]
    assert m["n_trials"] == len(m["trials"]) and m["stop_reason"] == "cannot_beat_best"
    assert m["chosen"]["settings"]["nodes_to_exclude"] == ["fragile"]
    assert json.loads(out.files["int8_search.json"])["trials"] == m["trials"]
    back = load_model(save_model(out.model), filename="q.onnx")  # passes the safe loader
    assert back.meta["quantized"] == f"{m['mode']}-{m['weight_type']}"


@pytest.mark.parametrize(
    ("arrays", "pattern"),
    [
        ({"feature": np.ones((4, 16), np.float32)}, r"model input 'features' is missing"),
        ({"features": np.ones((4, 15), np.float32)}, r"input 'features'.*\[4, 15\]|dim 1"),
        ({"features": np.ones((4, 16), np.int64) > 0}, r"input 'features': the model expects"),
    ],
    ids=["name", "shape", "dtype"],
)
def test_inputs_that_do_not_fit_are_refused_with_the_input_named(
    arrays, pattern, digits, ctx_factory, tmp_path
):
    ctx = with_inputs(ctx_factory(), tmp_path, arrays)
    params = OnnxQuantizeParams(inputs="feats", **QUICK_PARAMS)
    with pytest.raises(IncompatibleError, match=pattern):
        onnx_quantize(ModelArtifact("onnx", fragile_graph(), {}), digits, params, ctx)


def test_a_small_encoder_passes_on_the_grid(digits, ctx_factory, tmp_path):
    model = text_encoder(vocab_size=60, dim=16, heads=2, layers=1, ff_dim=32, max_len=12)
    proto = onnx.load_model_from_string(text_encoder_onnx(model))
    arrays = text_encoder_inputs(rows=24, seq_len=10, vocab_size=60)
    ctx = with_inputs(ctx_factory(), tmp_path, arrays, inputs_id="tokens")
    params = OnnxQuantizeParams(inputs="tokens", **QUICK_PARAMS)
    out = onnx_quantize(ModelArtifact("onnx", proto, {}), digits, params, ctx)
    assert out.verdict.passed, out.verdict.reason
    assert out.metrics["kind"] == "embedding"
    assert out.metrics["chosen"]["parity"]["min_cosine"] >= 0.99
    assert out.metrics["size_bytes_after"] < out.metrics["size_bytes_before"]


def test_an_exported_classifier_is_searched_in_labels_mode_on_the_dataset(
    small_mlp, digits, ctx_factory
):
    onnx_model, _ = export_model(small_mlp, digits, OnnxExportParams())
    out = onnx_quantize(onnx_model, digits, OnnxQuantizeParams(**QUICK_PARAMS), ctx_factory())
    assert out.verdict.passed, out.verdict.reason
    assert out.metrics["kind"] == "labels" and out.metrics["inputs"]["split"] == "test"
    assert out.metrics["calibration"] == {"dataset": "digits", "split": "train", "rows": 256}
    assert out.metrics["chosen"]["parity"]["agreement"] >= 0.98


def test_a_gemm_named_as_in_the_graph_is_excluded_in_dynamic_mode(small_mlp, digits, ctx_factory):
    onnx_model, _ = export_model(small_mlp, digits, OnnxExportParams())
    gemms = [n.name for n in onnx_model.obj.graph.node if n.op_type == "Gemm"]
    params = OnnxQuantizeParams(nodes_to_exclude=(gemms[-1],))
    out = onnx_quantize(onnx_model, digits, params, ctx_factory())
    ops = [n.op_type for n in out.model.obj.graph.node]
    assert ops.count("MatMulInteger") == 1 and out.metrics["nodes_excluded"] == 1


def test_the_cli_searches_with_a_local_inputs_file(tmp_path, capsys):
    from modules.deployment.onnx_quantize import main

    model = tmp_path / "fragile.onnx"
    model.write_bytes(fragile_graph().SerializeToString())
    inputs = tmp_path / "features.npz"
    np.savez(inputs, **features())
    out = tmp_path / "q.onnx"
    argv = ["--input-model", str(model), "--output-model", str(out), "--search"]
    code = main([*argv, "--inputs", str(inputs)])
    assert code == 0, capsys.readouterr().err
    line = json.loads(capsys.readouterr().out)
    assert line["verdict"]["passed"] and line["metrics"]["kind"] == "embedding"
    assert line["metrics"]["chosen"]["settings"]["nodes_to_exclude"] == ["fragile"]
    assert load_model(out.read_bytes(), filename="q.onnx").framework == "onnx"

    missing = tmp_path / "missing.npz"
    assert main([*argv, "--inputs", str(missing)]) == 2
    assert f"error: inputs file {missing} does not exist" in capsys.readouterr().err


def test_a_rejected_search_still_stores_its_trials_and_a_parity_report(
    digits, ctx_factory, tmp_path
):
    ctx = with_inputs(ctx_factory(), tmp_path, features())
    params = OnnxQuantizeParams(
        inputs="feats", min_cosine=1.0, max_abs_error=0.0, batch_sizes=(1, 32), **QUICK_PARAMS
    )
    out = onnx_quantize(ModelArtifact("onnx", fragile_graph(), {}), digits, params, ctx)
    assert not out.verdict.passed and "best so far" in out.verdict.reason
    stored = json.loads(out.files["int8_search.json"])
    assert stored["trials"] and stored["stop_reason"] == "exclusion_cap"
    report = json.loads(out.files["parity_report.json"])
    assert report["graph"].startswith("best so far") and report["passed"] is False
    assert report["trial"] == out.metrics["chosen"]["trial"]
    assert report["batch_sizes"] == [1, 32] and set(report["by_batch_size"]) == {"b1", "b32"}
    assert report["thresholds"]["min_cosine"] == 1.0 and report["min_cosine"] < 1.0
    assert report["inputs"]["held_out_of"] == 64
    for trial in stored["trials"]:
        if trial["candidate"]:
            assert set(trial["by_batch_size"]) == {"b1", "b32"}


def test_one_row_cannot_be_split_into_scored_and_calibration_rows(digits, ctx_factory, tmp_path):
    from modules.errors import BadInputError

    ctx = with_inputs(ctx_factory(), tmp_path, features(rows=1))
    params = OnnxQuantizeParams(inputs="feats", **QUICK_PARAMS)
    with pytest.raises(BadInputError, match=r"has 1 row\(s\); the search needs at least 2"):
        onnx_quantize(ModelArtifact("onnx", fragile_graph(), {}), digits, params, ctx)
