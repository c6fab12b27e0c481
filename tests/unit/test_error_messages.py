"""Error messages stay bounded and readable whatever input they quote.

A refusal's message travels in gRPC metadata (`grpc-message`), which gRPC refuses past
16 KiB, and a caller must be able to read it: so every quoted input is cut and escaped
(`quote`), and every message sent is cut to `MAX_MESSAGE_CHARS` of printable ASCII
(`bound_message`). These properties are checked over arbitrary text.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.envelope import (
    check_free_text,
    check_message_id,
    check_method,
    check_purpose,
    decode_request,
)
from gateway.errors import MAX_MESSAGE_CHARS, QUOTE_CHARS, GatewayError, bound_message, quote
from gateway.identifiers import MemberId, SecurityServerId, ServiceId, SubsystemId

# the longest a quote can be: each character escaped as \U0010ffff, the quotes, the length
LONGEST_QUOTE = 10 * QUOTE_CHARS + 40

# text an attacker may send: any code point, with separators and escapes made likely, and
# long runs after a well-formed prefix (as in `UY/GOV/MSP/` and 7,000 backslashes)
_chars = st.one_of(st.characters(), st.sampled_from("/\\'\"\x00\x01\x7f\u202e"))
attacker_text = st.one_of(
    st.text(alphabet=_chars, max_size=300),
    st.builds(
        lambda head, char, count, tail: head + char * count + tail,
        st.sampled_from(["", "UY/GOV/MSP/", "UY/GOV/DNIC/identity/", "/a.B/", "x"]),
        _chars,
        st.integers(min_value=0, max_value=10_000),
        st.text(alphabet=_chars, max_size=30),
    ),
)

CHECKS: list[Callable[[str], object]] = [
    MemberId.parse,
    SubsystemId.parse,
    ServiceId.parse,
    SecurityServerId.parse,
    check_message_id,
    check_purpose,
    check_method,
    lambda text: check_free_text("gateway-user-id", text),
]


def _refusal(check: Callable[[Any], object], value: object) -> str:
    """The message of the check's refusal of `value` ("" when it accepts it)."""
    try:
        check(value)
    except GatewayError as err:
        return err.message
    return ""


def _controls(text: str) -> list[str]:
    return [c for c in text if ord(c) < 0x20 or ord(c) == 0x7F]


@given(attacker_text)
def test_bound_message_is_short_printable_ascii(text: str) -> None:
    """Any message, once bounded, is at most MAX_MESSAGE_CHARS of printable ASCII."""
    bounded = bound_message(text)
    assert len(bounded) <= MAX_MESSAGE_CHARS
    assert all(0x20 <= ord(c) <= 0x7E for c in bounded)


@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=200))
def test_short_printable_messages_pass_unchanged(text: str) -> None:
    """A printable ASCII message within the limit is sent as it is."""
    assert bound_message(text) == text


@given(attacker_text)
def test_quote_is_bounded_and_escapes_control_bytes(text: str) -> None:
    """A quoted input is bounded, free of raw control bytes, and says its length when cut."""
    quoted = quote(text)
    assert len(quoted) <= LONGEST_QUOTE
    assert not _controls(quoted)
    if len(text) > QUOTE_CHARS:
        assert f"({len(text)} characters)" in quoted


@pytest.mark.parametrize("check", CHECKS)
@given(text=attacker_text)
def test_refusals_of_any_input_are_bounded(check: Callable[[str], object], text: str) -> None:
    """Each identifier and metadata check refuses any input with a bounded message free of raw control bytes."""
    message = _refusal(check, text)
    assert len(message) <= 2 * LONGEST_QUOTE + 300
    assert not _controls(message)


@given(st.binary(max_size=20_000))
def test_malformed_envelope_headers_get_bounded_messages(data: bytes) -> None:
    """A peer's arbitrary header bytes are refused with a bounded message."""
    assert len(_refusal(decode_request, data)) <= 2 * LONGEST_QUOTE + 300
