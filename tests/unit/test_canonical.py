"""Unit tests of gateway.canonical: the one byte encoding of signed and chained values."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import canonical
from gateway.canonical import NotCanonicalError

# ---- encode ---------------------------------------------------------------------------


def test_encode_sorts_keys_without_whitespace() -> None:
    """encode sorts object keys at every depth and writes no insignificant whitespace."""
    value = {"b": 1, "a": [3, {"z": None, "y": True}], "c": "x y"}
    assert canonical.encode(value) == b'{"a":[3,{"y":true,"z":null}],"b":1,"c":"x y"}'


def test_encode_key_order_does_not_depend_on_insertion_order() -> None:
    """Two dicts with the same items encode to the same bytes whatever their insertion order."""
    assert canonical.encode({"a": 1, "b": 2}) == canonical.encode({"b": 2, "a": 1})


def test_encode_writes_utf8_not_ascii_escapes() -> None:
    """Non-ASCII text is written as UTF-8 bytes, not \\u escapes."""
    assert canonical.encode({"name": "Montevidéo ✓"}) == '{"name":"Montevidéo ✓"}'.encode()


def test_encode_escapes_control_characters() -> None:
    """Control characters, quotes and backslashes are escaped (the output stays one JSON text)."""
    assert canonical.encode('a"b\\c\nd\x01') == b'"a\\"b\\\\c\\nd\\u0001"'


def test_encode_rejects_nan() -> None:
    """NaN and infinities cannot be encoded."""
    for value in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(ValueError):  # noqa: PT011
            canonical.encode({"x": value})


def test_encode_rejects_floats() -> None:
    """encode refuses a float, since decode would refuse the bytes it produced."""
    with pytest.raises(ValueError):  # noqa: PT011
        canonical.encode({"amount": 1.5})


# ---- decode ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b'{"a": 1}',
        b'{"a":1 }',
        b'{ "a":1}',
        b'{"a":1,"b":2}\n',
        b' {"a":1}',
        b'{"a":1,\n"b":2}',
        b"[1, 2]",
        b'{\n  "a": 1\n}',
    ],
)
def test_decode_rejects_insignificant_whitespace(data: bytes) -> None:
    """Valid JSON with any insignificant whitespace is rejected as non-canonical."""
    with pytest.raises(NotCanonicalError, match="canonical form"):
        canonical.decode(data)


@pytest.mark.parametrize("data", [b'{"b":1,"a":2}', b'{"a":{"d":1,"c":2}}'])
def test_decode_rejects_unsorted_keys(data: bytes) -> None:
    """Objects whose keys are not sorted are rejected."""
    with pytest.raises(NotCanonicalError, match="canonical form"):
        canonical.decode(data)


@pytest.mark.parametrize("data", [b'"\\u00e9"', b'"\\/"', b'"\\u0041"', b"-0", b"01", b'"\\u001F"'])
def test_decode_rejects_alternative_spellings(data: bytes) -> None:
    """Escapes and number forms that encode would not write are rejected."""
    with pytest.raises(NotCanonicalError):
        canonical.decode(data)


@pytest.mark.parametrize("data", [b'{"a":1,"a":1}', b'{"a":1,"a":2}', b'{"x":{"k":null,"k":null}}'])
def test_decode_rejects_duplicate_keys(data: bytes) -> None:
    """An object with a repeated key is rejected as such."""
    with pytest.raises(NotCanonicalError, match="duplicate key"):
        canonical.decode(data)


@pytest.mark.parametrize(
    "data", [b"1.5", b"[0.5]", b'{"a":-2.25}', b"1e5", b"1E+5", b"100000.0", b"0.0"]
)
def test_decode_rejects_floats(data: bytes) -> None:
    """Numbers with a fraction or an exponent are rejected, even in their shortest form."""
    with pytest.raises(NotCanonicalError, match="floating-point"):
        canonical.decode(data)


@pytest.mark.parametrize("data", [b"NaN", b"[Infinity]", b'{"a":-Infinity}'])
def test_decode_rejects_nan_and_infinity(data: bytes) -> None:
    """NaN and the infinities (a Python json extension) are rejected."""
    with pytest.raises(NotCanonicalError, match="not allowed"):
        canonical.decode(data)


@pytest.mark.parametrize(
    "data",
    [
        b'"\xff"',
        b'"\xc3"',
        b'"\xc0\xaf"',
        b'"\xed\xa0\x80"',
        b'{"a":"\xe9"}',
        b"\xef\xbb\xbf{}",
    ],
)
def test_decode_rejects_invalid_utf8(data: bytes) -> None:
    """Bytes that are not UTF-8 (or carry a byte-order mark) are rejected."""
    with pytest.raises(NotCanonicalError):
        canonical.decode(data)


@pytest.mark.parametrize("data", [b"", b"{", b"[1,]", b"nul", b"{'a':1}", b"[1][2]"])
def test_decode_rejects_invalid_json(data: bytes) -> None:
    """Text that is not JSON at all is rejected with NotCanonicalError."""
    with pytest.raises(NotCanonicalError):
        canonical.decode(data)


def test_decode_rejects_deep_nesting_cleanly() -> None:
    """Nesting deep enough to exhaust recursion is reported as NotCanonicalError."""
    with pytest.raises(NotCanonicalError):
        canonical.decode(b"[" * 100_000 + b"]" * 100_000)


@pytest.mark.parametrize("data", [b'"\\ud800"', b'{"a":"\\udc00"}'])
def test_decode_rejects_lone_surrogate_escapes(data: bytes) -> None:
    """A lone UTF-16 surrogate escape raises NotCanonicalError, not a bare UnicodeEncodeError."""
    with pytest.raises(NotCanonicalError):
        canonical.decode(data)


def test_decode_rejects_huge_integers() -> None:
    """An integer literal beyond Python's digit limit raises NotCanonicalError."""
    with pytest.raises(NotCanonicalError):
        canonical.decode(b"1" * 5000)


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        False,
        0,
        -1,
        2**70,
        "",
        "é\u2028",
        [],
        {},
        {"": [None, {"a": "b"}]},
    ],
)
def test_decode_accepts_encode_output(value: Any) -> None:
    """decode accepts what encode wrote and yields an equal value."""
    data = canonical.encode(value)
    assert canonical.decode(data) == value
    assert canonical.encode(canonical.decode(data)) == data


# ---- properties -----------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=25,
)


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_property_round_trip(value: Any) -> None:
    """decode(encode(v)) == v for JSON-like values without floats, with identical bytes."""
    data = canonical.encode(value)
    decoded = canonical.decode(data)
    assert decoded == value
    assert canonical.encode(decoded) == data


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_property_decode_raises_only_not_canonical(data: bytes) -> None:
    """decode on arbitrary bytes either returns a value that re-encodes to them or raises NotCanonicalError."""
    try:
        value = canonical.decode(data)
    except NotCanonicalError:
        return
    assert canonical.encode(value) == data
