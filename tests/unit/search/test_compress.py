import html
import itertools
import json

import onnx
import pytest
from pydantic import ValidationError

from modules.core.jobspec import parse_job_spec
from modules.core.step import Verdict
from modules.pipeline.local import LocalWorkspace
from modules.search import compress as compress_mod
from modules.search.compress import Chain, CompressParams, StageCall, compress, student_widths
from modules.storage.model_formats import load_model, save_model

# Short training and timing: the tests check what the search decides, not how well it trains.
FAST = {
    "finetune_epochs": 2,
    "distill_epochs": 4,
    "proxy_distill_epochs": 2,
    "finalists": 2,
    "runs": 3,
    "warmup": 1,
}
ROOMY = {"memory_budget_mb": 64, "compute_scale": 1, "power_w": 1}


# What the module's search told progress displays, candidate by candidate.
REPORTS: list[dict] = []


@pytest.fixture(scope="module")
def searched(small_mlp, digits, tmp_path_factory):
    from modules.core.step import reporting_progress
    from tests.unit.conftest import make_ctx

    ctx = make_ctx(tmp_path_factory.mktemp("compress"), profile=ROOMY)
    with reporting_progress(REPORTS.append):
        return compress(small_mlp, digits, CompressParams(max_drop=5, **FAST), ctx)


def candidates_of(out):
    return json.loads(out.files["compress.json"])["candidates"]


def test_students_are_derived_from_the_teacher(small_mlp, digits):
    # 64-32-10 teacher: the same depth at 1/4 width, and 1/16 of the first width (min 8).
    assert student_widths(small_mlp, digits) == [[8]]
    wide = type(small_mlp)(
        "torch", small_mlp.obj, {"zoo_arch": {"name": "mlp", "hidden": [1024, 512]}}
    )
    assert student_widths(wide, digits) == [[256, 128], [256], [64]]


def test_search_returns_a_parity_gated_onnx_winner(searched, small_mlp):
    out = searched
    m = out.metrics
    assert out.verdict.passed and m["met_goal"] and m["outcome"] == "completed"
    assert out.model.framework == "onnx"
    onnx.checker.check_model(out.model.obj)
    winner = m["winner"]
    assert winner["parity"]["passed"]
    assert winner["size_bytes"] < m["baseline"]["size_bytes"]
    # The winner is the smallest of the candidates that passed the gate and the budget.
    passing = [c for c in candidates_of(out) if c["phase"] == "gate" and c.get("violations") == []]
    assert winner["size_bytes"] == min(c["size_bytes"] for c in passing)
    assert set(winner["latency_vs_input"]) >= {"ratio", "measurable"}
    for name in ("report.html", "deployment_report.json", "compress.json", "native_model.pt"):
        assert name in out.files
    native = load_model(out.files["native_model.pt"], filename="native_model.pt")
    assert native.framework == "torch"
    report = json.loads(out.files["deployment_report.json"])
    assert report["passed"] is True and report["compress"]["winner"]["label"] == winner["label"]
    # The waterfall: the input, each native stage of the winner's chain, then its ONNX tail.
    chain = next(c for c in candidates_of(out) if c["winner"])["chain"]
    steps = [p["step"] for p in m["waterfall"]]
    assert steps[0] == "input" and len(steps) == len(chain) + 2
    assert steps[-1] == winner["label"].split(" => ")[-1]
    assert m["waterfall"][-1]["size_bytes"] == winner["size_bytes"]
    page = out.files["report.html"].decode()
    assert "<svg" in page and html.escape(winner["label"]) in page


def test_candidates_include_chains_and_every_loser_says_why(searched):
    cands = candidates_of(searched)
    labels = {c["label"] for c in cands}
    # Multi-step native chains, int8 alone, and chains ending in ONNX Runtime int8.
    assert any(len(c["chain"]) >= 2 for c in cands)
    assert "input => onnx int8 dynamic" in labels
    assert any(c["chain"] and c["tail"] and c["tail"][0]["step"] == "onnx_quantize" for c in cands)
    assert {c["chain"][0]["step"] for c in cands if c["chain"]} >= {
        "prune_structured",
        "lowrank",
        "distill",
    }
    winners = [c for c in cands if c["winner"]]
    assert len(winners) == 1
    assert all(c["lost_because"] for c in cands if not c["winner"])
    gated = [c for c in cands if c["phase"] == "gate" and "error" not in c]
    for c in gated:
        assert {
            "size_bytes",
            "accuracy",
            "latency_ms",
            "latency_ci95",
            "energy_mj_estimate",
        } <= set(c)
        assert c["parity"]["agreement"] is not None


def test_impossible_budget_is_rejected_with_best_so_far(small_mlp, digits, ctx_factory):
    impossible = {"memory_budget_mb": 1e-6, "compute_scale": 1, "power_w": 1}
    out = compress(small_mlp, digits, CompressParams(**FAST), ctx_factory(profile=impossible))
    m = out.metrics
    assert out.verdict.passed is False and m["outcome"] == "rejected"
    assert m["reason"].startswith("no candidate met the goal on profile custom")
    assert "> budget 1e-06 MB" in m["reason"]
    assert out.model is not None and out.model.framework == "onnx"  # best-so-far, never nothing
    assert m["winner"]["parity"]["passed"]


def test_a_candidate_that_fails_parity_never_wins(small_mlp, digits, ctx_factory, monkeypatch):
    from modules.deployment import parity

    real = parity.check_parity

    def int8_fails(native, onnx_model, data, params):
        report, verdict = real(native, onnx_model, data, params)
        if onnx_model.meta.get("quantized") or onnx_model.meta.get("float16"):
            return {**report, "passed": False}, Verdict(False, "forced: int8/fp16 disagree")
        return report, verdict

    monkeypatch.setattr(parity, "check_parity", int8_fails)
    out = compress(
        small_mlp, digits, CompressParams(max_drop=100, **FAST), ctx_factory(profile=ROOMY)
    )
    cands = candidates_of(out)
    int8 = [c for c in cands if c["phase"] == "gate" and c["tail"]]
    assert int8 and all("parity: forced" in c["lost_because"] for c in int8)
    # int8 would be smaller; the fp32 export that passed parity wins instead.
    assert out.verdict.passed and out.metrics["winner"]["label"].endswith("onnx fp32")
    assert not out.model.meta.get("quantized")


def test_max_time_stops_new_candidates_but_still_gates_the_input(small_mlp, digits, ctx_factory):
    params = CompressParams(max_time_s=1e-6, **FAST)
    out = compress(small_mlp, digits, params, ctx_factory(profile=ROOMY))
    m = out.metrics
    assert m["stopped_by"] == "max_time"
    # Only the input ran, and it got every one of its endings: fp32, int8 and fp16.
    gates = [c for c in candidates_of(out) if c["phase"] == "gate"]
    assert {c["label"] for c in gates} == {
        "input => onnx fp32",
        "input => onnx int8 dynamic",
        "input => onnx int8 static",
        "input => onnx fp16",
    }
    assert m["n_gated"] == len(gates) and out.model is not None
    skipped = [c for c in candidates_of(out) if "max_time" in (c["lost_because"] or "")]
    assert skipped


class FakeClock:
    """The search's clock: a proxy run costs 1 s, a full training run 1000 s, gates nothing."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_the_endings_of_the_first_trained_chain_beat_max_time(
    small_mlp, digits, ctx_factory, monkeypatch
):
    """max_time runs out during the first full training: its int8 ending is still gated."""
    clock = FakeClock()
    real = compress_mod._run_native

    def timed(model, data, chain, ctx, *, measure, tag):
        out = real(model, data, chain, ctx, measure=measure, tag=tag)
        clock.now += 1000.0 if tag.startswith("f") else 1.0
        return out

    monkeypatch.setattr(compress_mod, "_clock", clock)
    monkeypatch.setattr(compress_mod, "_run_native", timed)
    params = CompressParams(max_time_s=100, max_drop=100, **FAST)
    out = compress(small_mlp, digits, params, ctx_factory(profile=ROOMY))
    cands = candidates_of(out)
    full = [c for c in cands if c["phase"] == "full"]
    assert len(full) == 1  # the clock ran out during it
    chain = full[0]["label"]
    endings = {
        c["label"]: c
        for c in cands
        if c["phase"] == "gate" and c["label"].startswith(chain + " =>")
    }
    assert set(endings) == {
        f"{chain} => onnx {t}" for t in ("fp32", "int8 dynamic", "int8 static", "fp16")
    }
    int8 = endings[f"{chain} => onnx int8 dynamic"]
    # Gated for real (on a graph this tiny int8's scales can outweigh its savings).
    assert int8["parity"]["agreement"] is not None and "size_bytes" in int8
    assert out.metrics["stopped_by"] == "max_time"
    not_trained = [c for c in cands if (c["lost_because"] or "").startswith("not fully trained")]
    assert not_trained


def test_fp16_ending_halves_the_graph_and_keeps_float32_io(searched):
    cands = candidates_of(searched)
    fp32 = next(c for c in cands if c["label"] == "input => onnx fp32")
    fp16 = next(c for c in cands if c["label"] == "input => onnx fp16")
    assert fp16["tail"] == [{"step": "onnx_float16", "params": {}}]
    assert fp16["parity"]["passed"]
    assert 0.45 < fp16["size_bytes"] / fp32["size_bytes"] < 0.6


def test_skipped_kinds_say_why(searched, small_knn, digits, ctx_factory):
    skipped = {s["kind"]: s["why"] for s in json.loads(searched.files["compress.json"])["skipped"]}
    assert (
        "ONNX stores the pruned weights dense"
        in skipped["prune_structured(method=unstructured) => onnx int8"]
    )
    out = compress(small_knn, digits, CompressParams(**FAST), ctx_factory(profile=ROOMY))
    summary = json.loads(out.files["compress.json"])
    kinds = {s["kind"]: s["why"] for s in summary["skipped"]}
    assert "ai.onnx.ml" in kinds["onnx fp16"] and "quantize" in kinds["onnx int8"]
    assert not any(c["tail"] for c in summary["candidates"] if c["phase"] == "gate")


def test_the_smallest_student_of_the_teacher_fits_a_microcontroller(small_mlp, digits):
    from modules.core.profiles import get_profile

    teacher = type(small_mlp)(
        "torch", small_mlp.obj, {"zoo_arch": {"name": "mlp", "hidden": [1024, 1024]}}
    )
    widths = student_widths(teacher, digits)
    smallest = min(widths, key=lambda w: sum(w))
    sizes = [digits.n_features, *smallest, digits.n_classes]
    params = sum((a + 1) * b for a, b in itertools.pairwise(sizes))
    budget = get_profile("mcu-256kb").memory_budget_mb * 2**20
    assert 4 * params < budget / 4  # float32 weights, with room for activations and runtime


def test_the_winning_chain_round_trips_as_a_job(searched, small_mlp, tmp_path):
    """The chain the search composed runs as plain job steps through run_step, and passes."""
    cand = next(c for c in candidates_of(searched) if c["winner"])
    ws = LocalWorkspace(tmp_path / "ws")
    model_file = tmp_path / "m.pt"
    model_file.write_bytes(save_model(small_mlp))
    key = ws.import_model(model_file, user_id="local")
    steps = [{"name": s["step"], "params": s["params"]} for s in cand["chain"]]
    steps += [{"name": "onnx_export"}]
    steps += [{"name": s["step"], "params": s["params"]} for s in cand["tail"] or []]
    steps += [{"name": "onnx_parity", "params": {"max_prob_diff": 0.1}}]
    spec = parse_job_spec({"model": key, "profile": ROOMY, "steps": steps})
    result = ws.run(spec)
    assert result.status == "COMPLETED", result.reason
    assert [r.step for r in result.records] == [s["name"] for s in steps]
    assert result.records[-1].verdict["passed"]


def test_a_new_chain_source_is_searched_without_changing_the_search(
    small_mlp, digits, ctx_factory, monkeypatch
):
    extra = Chain((StageCall("prune_structured", {"method": "structured", "amount": 0.3}),))

    def source(model, data, steps):
        return [extra]

    monkeypatch.setattr(compress_mod, "_CHAIN_SOURCES", [source])
    out = compress(small_mlp, digits, CompressParams(**FAST), ctx_factory(profile=ROOMY))
    proxies = [c["label"] for c in candidates_of(out) if c["phase"] == "proxy"]
    assert proxies == ["input", "prune_structured(method=structured, amount=0.3)"]


@pytest.mark.parametrize(
    ("bad", "field"),
    [({"max_drop": -1}, "max_drop"), ({"objective": "speed"}, "objective"), ({"eta": 1}, "eta")],
)
def test_bad_params_are_refused(bad, field):
    with pytest.raises(ValidationError, match=field):
        CompressParams(**bad)


def test_every_candidate_is_reported_to_progress_displays(searched):
    own = [r for r in REPORTS if r.get("phase") in ("proxy", "full training", "ONNX gate")]
    by_phase = {}
    for report in own:
        by_phase.setdefault(report["phase"], []).append(report)
    assert {"proxy", "ONNX gate"} <= set(by_phase)
    assert len(by_phase["proxy"]) == by_phase["proxy"][0]["total"]  # every chain
    for reports in by_phase.values():
        done = [r["done"] for r in reports]
        assert done == sorted(set(done)) and done[-1] <= reports[-1]["total"]
    gated = [c for c in candidates_of(searched) if c["phase"] == "gate"]
    assert len(by_phase["ONNX gate"]) == len(gated)
    assert all(r["text"].startswith(r["phase"]) for r in own)


def test_forest_candidates_keep_shares_of_its_own_trees(digits):
    from sklearn.ensemble import RandomForestClassifier

    from modules.core.artifact import ModelArtifact
    from modules.search.compress import sklearn_chains

    forest = RandomForestClassifier(n_estimators=20, max_depth=4, random_state=0)
    forest.fit(digits.X_train, digits.y_train)
    chains = sklearn_chains(ModelArtifact("sklearn", forest, {}), digits, {"forest_prune"})
    counts = [c.stages[0].params["n_trees"] for c in chains if isinstance(c, Chain)]
    assert counts == [1, 2, 4, 6, 10]
