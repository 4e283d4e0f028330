import csv
import io
import itertools

import pytest
from pydantic import ValidationError

from modules.errors import BadInputError
from modules.search.auto import AutoParams, auto, sensitivity_guide
from modules.search.sensitivity import (
    SensitivityParams,
    candidate_layers,
    recommended_layers,
    safe_levels,
    sensitivity,
)
from modules.training.train import TrainParams, train_baseline

FAST = {"runs": 3, "warmup": 1}
ROOMY = {"memory_budget_mb": 64, "compute_scale": 1, "power_w": 1}


@pytest.fixture(scope="module")
def deep_mlp(digits):
    """64-32-16-10: two hidden layers, so a scan has more than one layer to compare."""
    arch = {"name": "mlp", "hidden": [32, 16]}
    artifact, _ = train_baseline(TrainParams(model="mlp", arch=arch, epochs=8), digits, seed=0)
    return artifact


@pytest.mark.parametrize(
    ("technique", "levels", "layers"),
    [
        ("prune", [0.25, 0.75], ["0", "2"]),  # the classifier (4) keeps one output per class
        ("unstructured", [0.5, 0.9], ["0", "2", "4"]),
        ("lowrank", [0.5, 0.1], ["0", "2", "4"]),
    ],
)
def test_one_row_per_layer_and_level(deep_mlp, digits, ctx_factory, technique, levels, layers):
    params = SensitivityParams(technique=technique, levels=levels)
    out = sensitivity(deep_mlp, digits, params, ctx_factory())
    rows = out.metrics["rows"]
    assert out.model is None
    assert [(r["layer"], r["level"]) for r in rows] == list(itertools.product(layers, levels))
    baseline = out.metrics["baseline_accuracy"]
    for row in rows:
        assert row["accuracy_drop_pt"] == pytest.approx(100 * (baseline - row["accuracy"]))
    table = list(csv.DictReader(io.StringIO(out.files["sensitivity.csv"].decode())))
    assert len(table) == len(layers) * len(levels)
    # Compressing harder never helps much: the strongest level drops at least as much.
    by_layer = {layer: [r for r in rows if r["layer"] == layer] for layer in layers}
    assert any(rs[-1]["accuracy_drop_pt"] > rs[0]["accuracy_drop_pt"] for rs in by_layer.values())


def test_structured_rows_really_remove_parameters(deep_mlp, digits, ctx_factory):
    params = SensitivityParams(technique="prune", levels=[0.5], include=["2"])
    rows = sensitivity(deep_mlp, digits, params, ctx_factory()).metrics["rows"]
    assert len(rows) == 1 and rows[0]["layer"] == "2"
    # Half of layer 2's 16 neurons: 8 x (32 in + 1 bias) and 8 x 10 out go away.
    assert rows[0]["params_before"] - rows[0]["params_after"] == 8 * 33 + 8 * 10


def test_include_pattern_matching_nothing_is_refused(deep_mlp, digits, ctx_factory):
    params = SensitivityParams(technique="prune", include=["4"])
    with pytest.raises(BadInputError, match=r"'4' matches no layer.*0, 2 \(the classifier"):
        sensitivity(deep_mlp, digits, params, ctx_factory())


def test_levels_are_checked_against_the_technique():
    with pytest.raises(ValidationError, match=r"prune levels are amounts in \(0, 1\)"):
        SensitivityParams(technique="prune", levels=[1.0])
    assert SensitivityParams(technique="lowrank", levels=[1.0]).levels == [1.0]
    with pytest.raises(ValidationError, match=r"levels.0\n  Input should be greater than 0"):
        SensitivityParams(technique="lowrank", levels=[0.0])


def test_recommendation_takes_the_strongest_level_within_the_drop():
    rows = [
        {"layer": "0", "level": 0.25, "accuracy_drop_pt": 0.2, "changed": True},
        {"layer": "0", "level": 0.5, "accuracy_drop_pt": 0.9, "changed": True},
        {"layer": "0", "level": 0.75, "accuracy_drop_pt": 6.0, "changed": True},
        {"layer": "2", "level": 0.25, "accuracy_drop_pt": 3.0, "changed": True},
    ]
    assert safe_levels(rows, technique="prune", max_drop_pt=1.0) == {"0": 0.5, "2": None}
    assert recommended_layers(rows, technique="prune", max_drop_pt=1.0) == {
        "0": {"amount": 0.5},
        "2": "skip",
    }
    lowrank = [
        {"layer": "0", "level": 0.5, "accuracy_drop_pt": 0.0, "changed": True},
        {"layer": "0", "level": 0.1, "accuracy_drop_pt": 0.5, "changed": True},
        {"layer": "4", "level": 0.5, "accuracy_drop_pt": 0.0, "changed": False},
    ]
    # Lowrank levels are shares of the rank kept: smaller is stronger. A level that left
    # the layer unchanged recommends nothing.
    assert recommended_layers(lowrank, technique="lowrank", max_drop_pt=1.0) == {
        "0": {"ratio": 0.1},
        "4": "skip",
    }


def test_recommended_params_are_valid_for_the_target_step(deep_mlp, digits, ctx_factory):
    from modules.core.registry import get_step

    params = SensitivityParams(technique="lowrank", levels=[0.5, 0.25], max_drop=100)
    m = sensitivity(deep_mlp, digits, params, ctx_factory()).metrics
    assert m["recommended_step"] == "lowrank"
    validated = get_step("lowrank").params.model_validate(m["recommended_params"])
    assert validated.rank_rule == "ratio" and set(validated.layers) <= {"0", "2", "4"}


def _scan_record(index=0):
    rows = [
        {"layer": "0", "level": 0.25, "accuracy_drop_pt": 0.1, "changed": True},
        {"layer": "0", "level": 0.5, "accuracy_drop_pt": 9.0, "changed": True},
    ]
    return {"index": index, "step": "sensitivity", "metrics": {"technique": "prune", "rows": rows}}


def test_auto_tries_per_layer_amounts_from_an_earlier_scan(small_mlp, digits, ctx_factory):
    search = [
        {
            "step": "prune_structured",
            "grid": {"amount": [0.5, 0.75]},
            "base_params": {"finetune_epochs": 0},
        }
    ]
    params = AutoParams(search=search, max_drop=1.0, **FAST)
    ctx = ctx_factory(profile=ROOMY, history=[_scan_record()])
    m = auto(small_mlp, digits, params, ctx).metrics
    labels = [r["label"] for r in m["rows"]]
    # At 0.75 the twin would be the same model as at 0.5 (layer 0 capped at 0.25 either way,
    # and the classifier is never pruned), so it is not tried twice.
    assert labels == [
        "input",
        "prune_structured(amount=0.5)",
        "prune_structured(amount=0.5) per-layer (sensitivity)",
        "prune_structured(amount=0.75)",
    ]
    uniform, guided = m["rows"][1], m["rows"][2]
    # Layer 0 is safe only up to 0.25, so the twin prunes it less than the uniform 0.5.
    assert guided["trial_params"]["layers"] == {"0": {"amount": 0.25}}
    assert guided["params"] > uniform["params"]
    assert m["sensitivity"]["from_step"] == 0 and m["sensitivity"]["safe_levels"] == {"0": 0.25}
    off = auto(small_mlp, digits, params.model_copy(update={"use_sensitivity": False}), ctx).metrics
    assert len(off["rows"]) == 3 and off["sensitivity"] is None


def test_guide_ignores_layers_the_model_no_longer_has(small_mlp):
    record = _scan_record()
    record["metrics"]["rows"].append(
        {"layer": "9", "level": 0.25, "accuracy_drop_pt": 0.0, "changed": True}
    )
    guide = sensitivity_guide([record], small_mlp, tolerance_pt=1.0)
    assert guide is not None and guide.safe == {"0": 0.25}
    assert candidate_layers(small_mlp.obj, "prune") == ["0"]
    assert sensitivity_guide([], small_mlp, tolerance_pt=1.0) is None
