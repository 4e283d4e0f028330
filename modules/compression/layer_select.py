"""Per-layer control for the torch techniques: a `layers` param of name patterns -> settings.

`layers` maps fnmatch patterns over module names (as `model.named_modules()` spells them)
to that layer's own setting, or to "skip":

    {"features.0": {"rank": 32}, "classifier.*": {"energy": 0.95}, "fc_out": "skip"}

A layer matched by an exact name takes that entry; otherwise the first wildcard pattern
that matches it, in the order given; a layer matched by none uses the step's global
setting. A pattern that matches none of the layers the technique can change is refused,
naming the pattern and the layer names it could have matched. prune_structured, lowrank
and quantize_dynamic validate the values with `check_layer_settings` (in their params
model) and resolve them against the model with `resolve_layers`.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from modules.errors import BadInputError

SKIP = "skip"
MAX_PATTERNS = 256
MAX_PATTERN_LEN = 200

# A value checker: returns the value in canonical form or raises ValueError(why).
SettingCheck = Callable[[Any], Any]


def number_in(
    lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False
) -> SettingCheck:
    """A checker for a finite number in [lo, hi], either end optionally open."""
    left, right = "(" if lo_open else "[", ")" if hi_open else "]"

    def check(value: Any) -> float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok and math.isfinite(value):
            above = value > lo if lo_open else value >= lo
            below = value < hi if hi_open else value <= hi
            if above and below:
                return float(value)
        raise ValueError(f"must be a number in {left}{lo:g}, {hi:g}{right}, got {value!r}")

    return check


def int_at_least(lo: int) -> SettingCheck:
    """A checker for an integer >= lo."""

    def check(value: Any) -> int:
        if isinstance(value, int) and not isinstance(value, bool) and value >= lo:
            return int(value)
        raise ValueError(f"must be an integer >= {lo}, got {value!r}")

    return check


def one_of(*choices: str) -> SettingCheck:
    """A checker for one of a few strings."""

    def check(value: Any) -> str:
        if value in choices:
            return str(value)
        raise ValueError(f"must be one of {list(choices)}, got {value!r}")

    return check


def check_layer_settings(
    layers: Any, *, allowed: Mapping[str, SettingCheck], exactly_one: bool = True
) -> dict[str, Any]:
    """Validate a `layers` param: pattern -> "skip" or {key: value} with keys from `allowed`.

    Raises ValueError naming the pattern (pydantic turns it into the params error).
    exactly_one: each setting gives one key (a layer's rank *or* energy, not both).
    """
    if not isinstance(layers, Mapping):
        raise ValueError(f"layers must be an object of pattern -> setting, got {layers!r}")
    if len(layers) > MAX_PATTERNS:
        raise ValueError(f"layers has {len(layers)} patterns; at most {MAX_PATTERNS}")
    keys = ", ".join(allowed)
    out: dict[str, Any] = {}
    for pattern, setting in layers.items():
        if not isinstance(pattern, str) or not pattern or len(pattern) > MAX_PATTERN_LEN:
            raise ValueError(
                f"layers: pattern {pattern!r} must be a non-empty string of at most "
                f"{MAX_PATTERN_LEN} characters"
            )
        where = f"layers[{pattern!r}]"
        if setting == SKIP:
            out[pattern] = SKIP
            continue
        if not isinstance(setting, Mapping) or not setting:
            raise ValueError(f'{where}: expected "skip" or an object with {keys}, got {setting!r}')
        unknown = sorted(str(k) for k in set(setting) - set(allowed))
        if unknown:
            raise ValueError(f"{where}: unknown setting(s) {unknown}; a layer takes {keys}")
        if exactly_one and len(setting) != 1:
            raise ValueError(f"{where}: give exactly one of {keys}, got {sorted(setting)}")
        checked: dict[str, Any] = {}
        for key, value in setting.items():
            try:
                checked[key] = allowed[key](value)
            except ValueError as exc:
                raise ValueError(f"{where}.{key} {exc}") from None
        out[pattern] = checked
    return out


@dataclass(frozen=True)
class LayerChoice:
    """What `layers` says about one layer: its setting (None = skip) and the pattern that won."""

    layer: str
    pattern: str
    setting: dict[str, Any] | None = field(default=None)

    @property
    def skip(self) -> bool:
        return self.setting is None

    @property
    def exact(self) -> bool:
        """True when the layer was named exactly rather than matched by a wildcard."""
        return self.pattern == self.layer


def resolve_layers(
    layers: Mapping[str, Any],
    names: Sequence[str],
    *,
    step: str,
    hint: str = "",
) -> dict[str, LayerChoice]:
    """layer name -> LayerChoice for every layer some pattern matches; unmatched patterns raise.

    names: the layers the technique can change, in module order.
    hint: appended to the error, e.g. why a layer the user expected is not a candidate.
    """
    chosen: dict[str, LayerChoice] = {}
    used: set[str] = set()
    for name in names:
        if name in layers:
            chosen[name] = _choice(name, name, layers[name])
            used.add(name)
            continue
        for pattern, setting in layers.items():
            if fnmatch.fnmatchcase(name, pattern):
                chosen[name] = _choice(name, pattern, setting)
                used.add(pattern)
                break
    # A pattern shadowed by an earlier one still counts as matching when it fits a layer.
    _refuse_unmatched([p for p in layers if p not in used], names, step=step, hint=hint)
    return chosen


def select_layers(
    patterns: Sequence[str], names: Sequence[str], *, step: str, hint: str = ""
) -> list[str]:
    """The names (in their order) that any of `patterns` matches; unmatched patterns raise."""
    _refuse_unmatched(patterns, names, step=step, hint=hint)
    return [n for n in names if any(n == p or fnmatch.fnmatchcase(n, p) for p in patterns)]


def _refuse_unmatched(
    patterns: Sequence[str], names: Sequence[str], *, step: str, hint: str
) -> None:
    unmatched = [
        p for p in patterns if p not in names and not any(fnmatch.fnmatchcase(n, p) for n in names)
    ]
    if unmatched:
        available = ", ".join(names) if names else "(none)"
        which = ", ".join(repr(p) for p in unmatched)
        raise BadInputError(
            f"{step}: layers pattern {which} matches no layer; the layers it can set are: "
            f"{available}{hint}"
        )


def _choice(layer: str, pattern: str, setting: Any) -> LayerChoice:
    return LayerChoice(layer, pattern, None if setting == SKIP else dict(setting))


def describe_choices(choices: Mapping[str, LayerChoice]) -> dict[str, Any]:
    """The resolved per-layer settings as JSON for a step's metrics: layer -> setting/"skip"."""
    return {
        name: {"setting": SKIP if c.skip else c.setting, "pattern": c.pattern}
        for name, c in choices.items()
    }


def layers_field(setting: str, *, fallback: str, no_match: str) -> Any:
    """The `layers` field: its rules are written here once, each technique names its setting."""
    return Field(
        default_factory=dict,
        description=f"Per-layer control: fnmatch pattern over layer names -> {setting}, or "
        '"skip" (the layer is left as it is). An exact name wins, then the first matching '
        f"pattern; unmatched layers use {fallback}; {no_match} is an error.",
    )


class LayerControlFields(BaseModel):
    """The `layers` param of a per-layer technique; LAYER_SETTINGS names its setting's keys."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    LAYER_SETTINGS: ClassVar[Mapping[str, SettingCheck]] = {}

    layers: dict[str, Any] = layers_field(
        "the technique's own setting",
        fallback="the step-wide setting",
        no_match="a pattern matching no candidate layer",
    )

    @field_validator("layers", mode="before")
    @classmethod
    def _check_layers(cls, value: Any) -> dict[str, Any]:
        return check_layer_settings(value, allowed=cls.LAYER_SETTINGS)
