"""Hardware profiles: the budgets a compressed model must fit."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from modules.errors import NotFoundError


class Profile(BaseModel):
    """A hardware budget. `compute_scale` is the target's speed relative to the measuring CPU."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(
        min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$", description="Profile name."
    )
    memory_budget_mb: float = Field(
        gt=0, le=1_048_576, description="RAM available for model + activations, in MB."
    )
    flash_mb: float | None = Field(
        default=None, gt=0, le=1_048_576, description="Storage for the model file, in MB."
    )
    compute_scale: float = Field(
        gt=0, le=100, description="Target speed / measuring-CPU speed (0.75 = 25% slower)."
    )
    power_w: float = Field(gt=0, le=10_000, description="Active power draw in watts.")
    latency_budget_ms: float | None = Field(
        default=None, gt=0, description="Max estimated latency per batch-1 inference, in ms."
    )
    description: str = Field(default="", max_length=500, description="Free text.")


BUILTIN_PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile(
            name="edge-8mb",
            memory_budget_mb=8,
            compute_scale=0.75,
            power_w=2.0,
            latency_budget_ms=20,
            description="Edge board: 8 MB RAM, 0.75x of the measuring CPU.",
        ),
        Profile(
            name="mcu-256kb",
            memory_budget_mb=0.25,
            flash_mb=1,
            compute_scale=0.02,
            power_w=0.05,
            latency_budget_ms=100,
            description="Microcontroller class: 256 KB SRAM, 1 MB flash.",
        ),
        Profile(
            name="mobile",
            memory_budget_mb=256,
            compute_scale=0.5,
            power_w=3.0,
            latency_budget_ms=30,
            description="Phone CPU: 256 MB for the model, half the measuring CPU's speed.",
        ),
        Profile(
            name="cloud-cpu",
            memory_budget_mb=4096,
            compute_scale=1.0,
            power_w=65.0,
            latency_budget_ms=50,
            description="A cloud vCPU like the measuring machine.",
        ),
    )
}


def get_profile(ref: str | Profile | dict[str, object]) -> Profile:
    """A built-in profile by name, or an inline budget."""
    if isinstance(ref, Profile):
        return ref
    if isinstance(ref, dict):
        return Profile.model_validate({"name": "custom", **ref})
    try:
        return BUILTIN_PROFILES[ref]
    except KeyError:
        known = ", ".join(sorted(BUILTIN_PROFILES))
        raise NotFoundError(f"unknown profile {ref!r}; known profiles: {known}") from None
