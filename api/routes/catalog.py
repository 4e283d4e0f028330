"""GET /v1/steps (the registry with each params JSON Schema) and GET /v1/profiles."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import CurrentUser
from api.schemas import ProfilesPublic, StepPublic, StepsPublic

router = APIRouter(prefix="/v1", tags=["catalog"])


@router.get("/steps", response_model=StepsPublic)
def list_steps(_: CurrentUser) -> StepsPublic:
    """Every registered step: what it accepts, whether it is a gate, its params schema."""
    # Loading the registry imports the step modules (and torch): only on first call.
    from modules.core.registry import list_steps as registered

    steps = [StepPublic.model_validate(step.describe()) for step in registered()]
    return StepsPublic(data=steps, count=len(steps))


@router.get("/profiles", response_model=ProfilesPublic)
def list_profiles(_: CurrentUser) -> ProfilesPublic:
    """The built-in hardware profiles (a job may also give an inline budget)."""
    from modules.core.profiles import BUILTIN_PROFILES

    data = [profile.model_dump(mode="json") for profile in BUILTIN_PROFILES.values()]
    return ProfilesPublic(data=data, count=len(data))
