"""Repeated runs on a deterministic seed schedule, each metric summarized with its 95% CI.

`seed_schedule(base, n)` is the same list on every machine: the first seed is `base`
itself (so one repeat reproduces the plain run), the others come from numpy's
`SeedSequence(base)`, which spreads them far apart. `repeat_runs(fn, n, seed)` calls
`fn(seed_i)` for each, and every numeric metric `fn` returns (nested dicts flattened
with dots; a stat dict contributes its median) gets `stats.summarize`: mean, median,
std, min, max, Student-t 95% CI and n.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from modules.errors import BadInputError
from modules.evaluation.stats import is_stat, summarize

MAX_SEED = 2**31 - 1
MAX_REPEATS = 1000


def seed_schedule(base_seed: int, n: int) -> list[int]:
    """n distinct seeds derived from `base_seed`; the first one is `base_seed`."""
    if n < 1 or n > MAX_REPEATS:
        raise BadInputError(f"repeats must be in [1, {MAX_REPEATS}], got {n}")
    if not 0 <= base_seed <= MAX_SEED:
        raise BadInputError(f"seed must be in [0, {MAX_SEED}], got {base_seed}")
    seeds = [base_seed]
    # Draw a few spares: a derived seed may collide with base_seed or with another one.
    state = np.random.SeedSequence(base_seed).generate_state(2 * n + 8)
    for value in state:
        seed = int(value) & MAX_SEED
        if len(seeds) == n:
            break
        if seed not in seeds:
            seeds.append(seed)
    return seeds


def flatten_numbers(metrics: Mapping[str, Any], *, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested metrics dict as {"a.b": value}; stat dicts give their median."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if is_stat(value):
            out[name] = float(value["median"])
        elif isinstance(value, Mapping):
            out.update(flatten_numbers(value, prefix=f"{name}."))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def repeat_runs(fn: Callable[[int], Mapping[str, Any]], n: int, seed: int) -> dict[str, Any]:
    """Run `fn(seed_i)` for the n seeds of the schedule; summarize each numeric metric.

    Returns {"n", "seeds", "metrics": {name: summarize(...)}, "runs": [flat metrics of each]}.
    A metric missing from some runs is summarized over the runs that have it (its n says so).
    """
    seeds = seed_schedule(seed, n)
    runs = [flatten_numbers(fn(s)) for s in seeds]
    names = sorted({name for run in runs for name in run})
    summary = {name: summarize([run[name] for run in runs if name in run]) for name in names}
    return {"n": n, "seeds": seeds, "metrics": summary, "runs": runs}
