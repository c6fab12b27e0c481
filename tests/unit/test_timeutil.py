from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from gateway.timeutil import format_time, parse_time


@pytest.mark.parametrize(
    "moment",
    [
        datetime(999, 1, 1, tzinfo=UTC),
        datetime(2026, 11, 23, 17, 0, 0, 123456, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    ],
)
def test_round_trip(moment: datetime) -> None:
    """Every aware moment formats to text that parses back to the same moment."""
    assert parse_time(format_time(moment)) == moment


def test_other_offsets_are_converted_to_utc() -> None:
    """A time in another zone is written in UTC with a Z suffix."""
    moment = datetime(2026, 1, 1, 12, tzinfo=timezone(timedelta(hours=-3)))
    assert format_time(moment) == "2026-01-01T15:00:00.000000Z"


def test_naive_time_is_refused() -> None:
    """A naive datetime is an error: time in the gateway is always aware UTC."""
    with pytest.raises(ValueError, match="naive"):
        format_time(datetime(2026, 1, 1))


@pytest.mark.parametrize(
    "text",
    ["2026-01-01T00:00:00Z", "2026-01-01T00:00:00.000000+00:00", "2026-1-01T00:00:00.000000Z", ""],
)
def test_non_canonical_text_is_refused(text: str) -> None:
    """Only the canonical text form parses."""
    with pytest.raises(ValueError, match=r"format|canonical"):
        parse_time(text)
