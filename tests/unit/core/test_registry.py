import pytest
from pydantic import BaseModel, ConfigDict, Field

from modules.core.registry import (
    DuplicateStepError,
    get_step,
    list_steps,
    register_step,
    unregister_step,
)
from modules.errors import NotFoundError


class _Params(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    amount: float = Field(default=0.5, ge=0, lt=1, description="How much.")


def test_duplicate_name_raises():
    @register_step("t_dup", params=_Params, accepts={"torch"})
    def first(model, data, params, ctx):
        """First."""

    try:
        with pytest.raises(DuplicateStepError, match="t_dup"):

            @register_step("t_dup", params=_Params, accepts={"torch"})
            def second(model, data, params, ctx):
                """Second."""

        assert get_step("t_dup").fn is first
    finally:
        unregister_step("t_dup")


def test_unknown_name_lists_known_steps():
    with pytest.raises(NotFoundError) as info:
        get_step("no_such_step")
    message = str(info.value)
    assert "no_such_step" in message
    assert "measure" in message and "train" in message


def test_unknown_input_kind_is_refused():
    with pytest.raises(ValueError, match="tensorflow"):
        register_step("t_bad_kind", params=_Params, accepts={"tensorflow"})


def test_every_builtin_step_has_described_forbidding_params():
    steps = list_steps()
    assert {"train", "measure"} <= {s.name for s in steps}
    for step in steps:
        schema = step.schema()
        assert schema.get("additionalProperties") is False, step.name
        for name, prop in schema.get("properties", {}).items():
            assert prop.get("description"), f"{step.name}.{name} has no description"
        assert step.params.model_config.get("frozen") is True, step.name
