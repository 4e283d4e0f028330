"""One registry of steps. A step is a plain function with a frozen pydantic params model."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from modules.errors import McaasError, NotFoundError

# "none" means the step takes no input model (e.g. `train` produces the first one).
KNOWN_INPUTS = frozenset({"torch", "sklearn", "onnx", "none"})


# (model, data, params, ctx) -> StepOutput. Each step narrows `model` and `params` to
# its own types, which a Protocol's contravariant parameters would refuse.
StepFunction = Callable[..., Any]


@dataclass(frozen=True)
class RegisteredStep:
    name: str
    fn: StepFunction
    params: type[BaseModel]
    accepts: frozenset[str]
    gate: bool
    summary: str

    def schema(self) -> dict[str, Any]:
        return self.params.model_json_schema()

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "summary": self.summary,
            "accepts": sorted(self.accepts),
            "gate": self.gate,
            "params_schema": self.schema(),
        }


class DuplicateStepError(McaasError):
    code = "duplicate_step"


_REGISTRY: dict[str, RegisteredStep] = {}

# Packages whose modules register the built-in steps on import. Every face (CLI, API,
# worker, ECS entry) calls load_builtin_steps(), so all see the same registry; a new
# technique file is picked up without editing a list here.
STEP_PACKAGES: tuple[str, ...] = (
    "modules.training",
    "modules.evaluation",
    "modules.compression",
    "modules.deployment",
    "modules.search",
)
_loaded = False


def register_step(
    name: str,
    *,
    params: type[BaseModel],
    accepts: Iterable[str],
    gate: bool = False,
) -> Callable[[StepFunction], StepFunction]:
    """Register `fn` as the step `name`; a second registration of a name raises."""
    accepted = frozenset(accepts)
    unknown = accepted - KNOWN_INPUTS
    if unknown:
        raise ValueError(f"step {name!r}: unknown input kinds {sorted(unknown)}")

    def decorator(fn: StepFunction) -> StepFunction:
        if getattr(fn, "__module__", None) == "__main__":
            # `python -m modules.compression.<name>` runs the file as __main__, and the
            # registry then imports it under its real name: only that copy registers.
            return fn
        if name in _REGISTRY:
            raise DuplicateStepError(f"step {name!r} is already registered")
        doc = (fn.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = RegisteredStep(
            name=name,
            fn=fn,
            params=params,
            accepts=accepted,
            gate=gate,
            summary=doc[0] if doc else name,
        )
        return fn

    return decorator


def unregister_step(name: str) -> None:
    """Remove a step (tests register throwaway steps)."""
    _REGISTRY.pop(name, None)


def load_builtin_steps() -> None:
    """Import every module of the step packages once (imports torch: keep it off API start-up)."""
    global _loaded
    if _loaded:
        return
    for package_name in STEP_PACKAGES:
        package = importlib.import_module(package_name)
        for info in pkgutil.iter_modules(package.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{package_name}.{info.name}")
    _loaded = True


def get_step(name: str) -> RegisteredStep:
    load_builtin_steps()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "(none)"
        raise NotFoundError(f"unknown step {name!r}; known steps: {known}") from None


def list_steps() -> list[RegisteredStep]:
    load_builtin_steps()
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]
