from collections import OrderedDict

import pytest
import torch
from torch import nn

from modules.compression.layer_select import (
    check_layer_settings,
    int_at_least,
    number_in,
    resolve_layers,
    select_layers,
)
from modules.compression.lowrank import lowrank_factorize
from modules.errors import BadInputError

AMOUNT = {"amount": number_in(0, 1, hi_open=True)}
NAMES = ["features.0", "features.2", "classifier.0", "classifier.2", "fc_out"]


def test_settings_are_checked_and_errors_name_the_pattern():
    ok = check_layer_settings({"a.*": {"amount": 0}, "b": "skip"}, allowed=AMOUNT)
    assert ok == {"a.*": {"amount": 0.0}, "b": "skip"}
    with pytest.raises(ValueError, match=r"layers\['fc'\]\.amount must be a number in \[0, 1\)"):
        check_layer_settings({"fc": {"amount": 1.0}}, allowed=AMOUNT)
    with pytest.raises(ValueError, match=r"layers\['fc'\]\.amount .* got -0\.1"):
        check_layer_settings({"fc": {"amount": -0.1}}, allowed=AMOUNT)
    with pytest.raises(ValueError, match=r"layers\['fc'\]: unknown setting\(s\) \['rank'\]"):
        check_layer_settings({"fc": {"rank": 3}}, allowed=AMOUNT)
    with pytest.raises(ValueError, match=r'layers\[\'fc\'\]: expected "skip"'):
        check_layer_settings({"fc": "drop"}, allowed=AMOUNT)
    both = {"rank": int_at_least(1), "energy": number_in(0, 1, lo_open=True)}
    with pytest.raises(ValueError, match="give exactly one of rank, energy"):
        check_layer_settings({"fc": {"rank": 2, "energy": 0.9}}, allowed=both)
    with pytest.raises(ValueError, match="must be an integer >= 1, got True"):
        check_layer_settings({"fc": {"rank": True}}, allowed=both)


def test_exact_name_wins_then_the_first_matching_pattern():
    layers = {
        "classifier.*": {"amount": 0.5},
        "*": {"amount": 0.1},
        "classifier.2": "skip",
        "features.*": {"amount": 0.3},  # shadowed by "*" for every layer: still not an error
    }
    chosen = resolve_layers(layers, NAMES, step="t")
    assert chosen["classifier.2"].skip and chosen["classifier.2"].exact
    assert chosen["classifier.0"].setting == {"amount": 0.5}
    assert chosen["classifier.0"].pattern == "classifier.*"
    assert chosen["features.0"].setting == {"amount": 0.1} and chosen["fc_out"].pattern == "*"


def test_a_pattern_matching_nothing_is_refused_with_the_layer_names():
    with pytest.raises(BadInputError) as err:
        resolve_layers({"features.*": "skip", "head.?": {"amount": 0.2}}, NAMES, step="prune")
    message = str(err.value)
    assert "layers pattern 'head.?' matches no layer" in message
    assert "features.0, features.2, classifier.0, classifier.2, fc_out" in message
    with pytest.raises(BadInputError, match=r"'nope' matches no layer; .*: \(none\) \(why\)"):
        resolve_layers({"nope": "skip"}, [], step="prune", hint=" (why)")


def test_select_layers_keeps_module_order():
    assert select_layers(["fc_out", "features.*"], NAMES, step="t") == [
        "features.0",
        "features.2",
        "fc_out",
    ]
    with pytest.raises(BadInputError, match="'x' matches no layer"):
        select_layers(["x"], NAMES, step="t")


def test_the_issue_example_on_a_named_model():
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(
            features=nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU()),
            classifier=nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU()),
            fc_out=nn.Linear(32, 10),
        )
    )
    layers = {"features.0": {"rank": 8}, "classifier.*": {"energy": 0.95}, "fc_out": "skip"}
    out, report = lowrank_factorize(model, rule="ratio", ratio=0.1, layers=layers)
    rows = {r["layer"]: r for r in report}
    assert rows["features.0"]["rank"] == 8 and rows["features.0"]["pattern"] == "features.0"
    # Unmatched layers use the global rule: ceil(0.1 * 64) = 7.
    assert rows["features.2"]["rank"] == 7 and "pattern" not in rows["features.2"]
    for name in ("classifier.0", "classifier.2"):
        assert rows[name]["energy_kept"] >= 0.95 and rows[name]["pattern"] == "classifier.*"
    assert not rows["fc_out"]["replaced"] and "skipped" in rows["fc_out"]["reason"]
    assert type(out.fc_out) is nn.Linear
    assert out(torch.rand(3, 64)).shape == (3, 10)
