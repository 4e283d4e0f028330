"""The expires_at attribute the DynamoDB tables' TTL reads."""

from __future__ import annotations

import pytest

from modules.storage.ttl import check_ttl_days, ttl_attribute


def test_zero_days_adds_nothing() -> None:
    assert ttl_attribute(0) == {}


def test_days_are_added_to_now_in_epoch_seconds() -> None:
    assert ttl_attribute(30, now=1_800_000_000.9) == {
        "expires_at": {"N": str(1_800_000_000 + 30 * 86_400)}
    }


@pytest.mark.parametrize("bad", [-1, 3651, 1.5, True, "7"])
def test_bad_day_counts_are_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="ttl_days"):
        check_ttl_days(bad)  # type: ignore[arg-type]
