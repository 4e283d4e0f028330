"""Expiry of DynamoDB records: the `expires_at` attribute that the tables' TTL reads."""

from __future__ import annotations

import time
from typing import Any

MAX_TTL_DAYS = 3650
TTL_ATTRIBUTE = "expires_at"


def check_ttl_days(days: int) -> int:
    """Return `days` if it is an int in 0..MAX_TTL_DAYS (0: records never expire)."""
    if not isinstance(days, int) or isinstance(days, bool) or not 0 <= days <= MAX_TTL_DAYS:
        raise ValueError(f"ttl_days must be an int in 0..{MAX_TTL_DAYS}, got {days!r}")
    return days


def ttl_attribute(days: int, *, now: float | None = None) -> dict[str, Any]:
    """The item attributes to add: {"expires_at": {"N": epoch seconds}}, or {} for 0 days.

    DynamoDB deletes an item some time (typically within days) after this epoch second.
    """
    if days == 0:
        return {}
    moment = time.time() if now is None else now
    return {TTL_ATTRIBUTE: {"N": str(int(moment) + days * 86_400)}}
