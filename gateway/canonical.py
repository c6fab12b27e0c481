"""Canonical JSON: the one byte encoding of everything the gateway signs or chains.

Objects are encoded with sorted keys, no insignificant whitespace, UTF-8, and only
strings, integers, booleans, null, lists and objects (no floats: their text form is not
unique). `decode` accepts only bytes that are already canonical, so that two parties can
never disagree about what a signature covers. Never sign a protobuf serialisation: it is
not deterministic across implementations.
"""

from __future__ import annotations

import json
from typing import Any

from gateway.errors import quote

JsonValue = Any


class NotCanonicalError(ValueError):
    """The bytes are not valid canonical JSON."""


def _reject_floats(text: str) -> float:
    raise NotCanonicalError(f"floating-point number {quote(text)} is not allowed")


def _reject_duplicates(pairs: list[tuple[str, JsonValue]]) -> dict[str, JsonValue]:
    out: dict[str, JsonValue] = {}
    for key, value in pairs:
        if key in out:
            raise NotCanonicalError(f"duplicate key {quote(key)}")
        out[key] = value
    return out


_SCALARS = (str, int, bool, type(None))


def _check_encodable(value: JsonValue) -> None:
    if type(value) in _SCALARS:
        return
    if isinstance(value, float):
        raise NotCanonicalError(f"floating-point number {value!r} is not allowed")
    if isinstance(value, dict):
        for item in value.values():
            if type(item) not in _SCALARS:
                _check_encodable(item)
    elif isinstance(value, list | tuple):
        for item in value:
            _check_encodable(item)


# what json.dumps and json.loads would build on every call with these arguments, built once
_ENCODER = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)
_DECODER = json.JSONDecoder(
    object_pairs_hook=_reject_duplicates, parse_float=_reject_floats, parse_constant=_reject_floats
)


def encode(value: JsonValue) -> bytes:
    """The canonical bytes of a JSON value; `NotCanonicalError` for floats."""
    _check_encodable(value)
    return _ENCODER.encode(value).encode("utf-8")


def decode(data: bytes) -> JsonValue:
    """Parse canonical JSON; raise `NotCanonicalError` for anything else."""
    try:
        text = data.decode("utf-8")
        value = _DECODER.decode(text)
        canonical = encode(value)
    except NotCanonicalError:
        raise
    except (ValueError, RecursionError) as exc:
        # JSONDecodeError, UnicodeError (lone surrogates), the integer digit limit
        raise NotCanonicalError(f"not valid JSON: {exc}") from None
    if canonical != data:
        raise NotCanonicalError("JSON is valid but not in canonical form")
    return value
