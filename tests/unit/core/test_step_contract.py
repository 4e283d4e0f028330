"""One contract test over every registered step: schema, round-trip, bad params rejected."""

import pytest
from pydantic import ValidationError

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
