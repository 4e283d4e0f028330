"""One contract test over every registered step: schema, round-trip, bad params rejected."""

import pytest
from pydantic import BaseModel, Field, ValidationError

from modules.core.registry import KNOWN_INPUTS, list_steps

STEPS = list_steps()


@pytest.mark.parametrize("step", STEPS, ids=[s.name for s in STEPS])
def test_params_schema_is_complete(step):
    schema = step.schema()
    assert schema.get("additionalProperties") is False
    for name, prop in schema.get("properties", {}).items():
        assert prop.get("description"), f"{step.name}.{name} lacks a description"
    assert step.params.model_config.get("frozen") is True
    assert step.accepts and step.accepts <= KNOWN_INPUTS
    assert step.summary and step.summary != step.name, f"{step.name} needs a docstring"


@pytest.mark.parametrize("step", STEPS, ids=[s.name for s in STEPS])
def test_default_params_round_trip_through_json(step):
    try:
        defaults = step.params()
    except ValidationError:
        pytest.skip(f"{step.name} has required params")  # covered by the step's own tests
    again = step.params.model_validate_json(defaults.model_dump_json())
    assert again == defaults


@pytest.mark.parametrize("step", STEPS, ids=[s.name for s in STEPS])
def test_unknown_param_is_rejected_by_name(step):
    with pytest.raises(ValidationError, match="no_such_param"):
        step.params.model_validate({"no_such_param": 1})


def test_describe_is_json_ready():
    import json

    for step in STEPS:
        json.dumps(step.describe())


def _unbounded(schema: dict, defs: dict, path: str) -> list[str]:
    """Paths of the numbers without both bounds, and the lists without a length cap.

    Walks the JSON Schema the API validates against, so nested models, mixins (TimingFields,
    TrainingFields, LayerControlFields...), optional fields and list items are all covered.
    """
    if "$ref" in schema:
        return _unbounded(defs[schema["$ref"].rsplit("/", 1)[-1]], defs, path)
    found = []
    kind = schema.get("type")
    if kind in ("integer", "number") and "enum" not in schema and "const" not in schema:
        low = "minimum" in schema or "exclusiveMinimum" in schema
        high = "maximum" in schema or "exclusiveMaximum" in schema
        if not (low and high):
            found.append(f"{path} (lower bound: {low}, upper bound: {high})")
    if kind == "array" and "maxItems" not in schema:
        found.append(f"{path} (list without max_length)")
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        for sub in schema.get(key, []):
            found += _unbounded(sub, defs, path)
    if isinstance(schema.get("items"), dict):
        found += _unbounded(schema["items"], defs, f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        found += _unbounded(schema["additionalProperties"], defs, f"{path}{{}}")
    for name, prop in schema.get("properties", {}).items():
        found += _unbounded(prop, defs, f"{path}.{name}")
    return found


@pytest.mark.parametrize("step", STEPS, ids=[s.name for s in STEPS])
def test_every_number_has_both_bounds(step):
    schema = step.schema()
    assert _unbounded(schema, schema.get("$defs", {}), step.name) == []


def test_the_bounds_walk_finds_an_unbounded_list_item():
    class Loose(BaseModel):
        sizes: list[int] = Field(default=[1], max_length=4, description="Sizes.")
        depth: int = Field(default=1, ge=1, description="Depth.")

    found = _unbounded(Loose.model_json_schema(), {}, "loose")
    assert found == [
        "loose.sizes[] (lower bound: False, upper bound: False)",
        "loose.depth (lower bound: True, upper bound: False)",
    ]


@pytest.mark.parametrize(
    ("step_name", "params", "field"),
    [
        ("measure", {"batch_sizes": [10**18]}, "batch_sizes.0"),
        ("measure", {"batch_sizes": [1, 0]}, "batch_sizes.1"),
        ("measure", {"batch_sizes": [-5]}, "batch_sizes.0"),
        ("hardware_sim", {"memory_batch_sizes": [0]}, "memory_batch_sizes.0"),
        ("forest_prune", {"sweep_trees": [10**9]}, "sweep_trees.0"),
        ("knn_prototypes", {"search_ratios": [2.0]}, "search_ratios.0"),
        ("sensitivity", {"levels": [-0.5]}, "levels.0"),
        ("train", {"epochs": 10**9}, "epochs"),
    ],
)
def test_out_of_range_numbers_are_refused_by_name(step_name, params, field):
    step = next(s for s in STEPS if s.name == step_name)
    with pytest.raises(ValidationError) as caught:
        step.params.model_validate(params)
    assert field in {".".join(str(p) for p in e["loc"]) for e in caught.value.errors()}


def test_an_auto_grid_with_too_many_combinations_is_refused_before_validating_them():
    step = next(s for s in STEPS if s.name == "auto")
    grid = {"amount": [0.1, 0.2, 0.3, 0.4, 0.5], "finetune_epochs": list(range(50))}
    grid["round_to"] = list(range(1, 11))
    space = {"step": "prune_structured", "grid": grid}
    with pytest.raises(ValidationError, match="2500 combinations, over 1000"):
        step.params.model_validate({"search": [space]})
