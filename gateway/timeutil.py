"""Timestamps as they appear in signed documents: RFC 3339, UTC, microseconds, 'Z'.

Time is always timezone-aware UTC and is passed in; this module never reads the clock.
"""

from __future__ import annotations

from datetime import UTC, datetime

from gateway.errors import quote


def format_time(moment: datetime) -> str:
    """The canonical text of an aware datetime."""
    if moment.tzinfo is UTC:
        return moment.isoformat(timespec="microseconds")[:-6] + "Z"
    if moment.tzinfo is None:
        raise ValueError("naive datetime: every time in the gateway is timezone-aware UTC")
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_time(text: str) -> datetime:
    """Parse the canonical text form; raise ValueError for any other form."""
    if not isinstance(text, str):
        raise ValueError(f"timestamp must be a string, not {type(text).__name__}")
    if len(text) < 27 or text[-1] != "Z" or text[-8] != ".":
        raise ValueError(f"timestamp {quote(text)} is not in canonical form")
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None or format_time(moment) != text:
        raise ValueError(f"timestamp {quote(text)} is not in canonical form")
    return moment
