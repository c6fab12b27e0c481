"""Unit tests of gateway.envelope: signed headers, their strict decoding and the body digest."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import canonical, envelope
from gateway.envelope import RequestHeader, ResponseHeader
from gateway.errors import Code, GatewayError, RequestError, TrustError
from gateway.identifiers import SecurityServerId, ServiceId, SubsystemId

CREATED = datetime(2025, 6, 1, 12, 0, 0, 123456, tzinfo=UTC)
BODY = b"\x08\x96\x01 a protobuf body"


def make_request(**changes: Any) -> RequestHeader:
    fields: dict[str, Any] = {
        "message_id": "0f8e4a2c-1b7d-4c3e-9a65-2d1f0e9b8c7a",
        "client": SubsystemId.parse("UY/GOV/BPS/benefits"),
        "service": ServiceId.parse("UY/GOV/DNIC/identity/person/v1"),
        "method": "/identity.v1.PersonService/GetPerson",
        "purpose": "benefit-eligibility",
        "sender": SecurityServerId.parse("UY/GOV/BPS/ss1"),
        "created_at": CREATED,
        "body_sha256": envelope.sha256_hex(BODY),
    }
    fields.update(changes)
    return RequestHeader(**fields)


def make_response(**changes: Any) -> ResponseHeader:
    fields: dict[str, Any] = {
        "message_id": "0f8e4a2c-1b7d-4c3e-9a65-2d1f0e9b8c7a",
        "request_sha256": envelope.sha256_hex(make_request().encode()),
        "service": ServiceId.parse("UY/GOV/DNIC/identity/person/v1"),
        "sender": SecurityServerId.parse("UY/GOV/DNIC/ss1"),
        "created_at": CREATED,
        "body_sha256": envelope.sha256_hex(b"reply"),
    }
    fields.update(changes)
    return ResponseHeader(**fields)


def fields_of(header: RequestHeader | ResponseHeader) -> dict[str, Any]:
    value = canonical.decode(header.encode())
    assert isinstance(value, dict)
    return value


def expect_malformed(decode: Callable[[bytes], object], data: bytes) -> TrustError:
    with pytest.raises(TrustError) as info:
        decode(data)
    assert info.value.code is Code.MALFORMED_ENVELOPE
    return info.value


# ---- round trips ----------------------------------------------------------------------


def test_request_encode_is_canonical_json() -> None:
    """A request header encodes as canonical JSON with version, type and every field."""
    d = fields_of(make_request())
    assert d["v"] == envelope.PROTOCOL_VERSION
    assert d["type"] == "request"
    assert d["created_at"] == "2025-06-01T12:00:00.123456Z"
    assert d["client"] == "UY/GOV/BPS/benefits"
    assert d["user_id"] is None
    assert d["subject_ref"] is None


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"user_id": "jdoe@bps.gub.uy", "subject_ref": "ab" * 32},
        {"user_id": "x" * 256},
        {"service": ServiceId.parse("UY/GOV/DNIC/identity/person")},
    ],
)
def test_request_round_trip(changes: dict[str, Any]) -> None:
    """decode_request(h.encode()) == h, and re-encoding yields the same bytes."""
    header = make_request(**changes)
    data = header.encode()
    decoded = envelope.decode_request(data)
    assert decoded == header
    assert decoded.encode() == data


@pytest.mark.parametrize(
    "changes", [{}, {"grpc_status": 5, "grpc_message": "person not found"}, {"grpc_status": 16}]
)
def test_response_round_trip(changes: dict[str, Any]) -> None:
    """decode_response(h.encode()) == h, and re-encoding yields the same bytes."""
    header = make_response(**changes)
    data = header.encode()
    decoded = envelope.decode_response(data)
    assert decoded == header
    assert decoded.encode() == data


def test_created_at_is_normalised_to_utc() -> None:
    """A created_at in another time zone is encoded as the same instant in UTC."""
    local = CREATED.astimezone(timezone(timedelta(hours=-3)))
    assert fields_of(make_request(created_at=local))["created_at"] == "2025-06-01T12:00:00.123456Z"


# ---- rejections -----------------------------------------------------------------------

Mutation = Callable[[dict[str, Any]], None]


def _set(key: str, value: Any) -> Mutation:
    def apply(d: dict[str, Any]) -> None:
        d[key] = value

    return apply


def _delete(key: str) -> Mutation:
    def apply(d: dict[str, Any]) -> None:
        del d[key]

    return apply


REQUEST_MUTATIONS: dict[str, Mutation] = {
    # extra and missing fields
    "extra field": _set("extra", "x"),
    "extra null field": _set("priority", None),
    "missing purpose": _delete("purpose"),
    "missing optional user_id": _delete("user_id"),
    "missing v": _delete("v"),
    # wrong types
    "message_id int": _set("message_id", 1),
    "client null": _set("client", None),
    "service list": _set("service", ["UY/GOV/DNIC/identity/person/v1"]),
    "method object": _set("method", {"m": 1}),
    "purpose bool": _set("purpose", True),
    "sender int": _set("sender", 7),
    "created_at int": _set("created_at", 1748779200),
    "body_sha256 null": _set("body_sha256", None),
    "user_id int": _set("user_id", 5),
    "subject_ref list": _set("subject_ref", ["a"]),
    "v string": _set("v", "1"),
    "v 2": _set("v", 2),
    "v 0": _set("v", 0),
    # wrong type of header
    "type response": _set("type", "response"),
    "type null": _set("type", None),
    "type capitalised": _set("type", "Request"),
    # bad digests
    "digest upper-case": _set("body_sha256", "A" * 64),
    "digest short": _set("body_sha256", "a" * 63),
    "digest long": _set("body_sha256", "a" * 65),
    "digest not hex": _set("body_sha256", "g" * 64),
    "digest empty": _set("body_sha256", ""),
    # malformed identifiers and values
    "client lower-case instance": _set("client", "uy/GOV/BPS/benefits"),
    "client is a member": _set("client", "UY/GOV/BPS"),
    "client with whitespace": _set("client", " UY/GOV/BPS/benefits"),
    "service too short": _set("service", "UY/GOV/DNIC/identity"),
    "sender bad code": _set("sender", "UY/GOV/BPS/ss 1"),
    "method without service": _set("method", "GetPerson"),
    "purpose starts with dash": _set("purpose", "-x"),
    "message_id empty": _set("message_id", ""),
    "message_id too long": _set("message_id", "a" * 129),
    "created_at without micros": _set("created_at", "2025-06-01T12:00:00Z"),
    "created_at offset": _set("created_at", "2025-06-01T12:00:00.000000+00:00"),
    "created_at garbage": _set("created_at", "yesterday"),
    "user_id empty": _set("user_id", ""),
    "user_id control char": _set("user_id", "a\nb"),
    "subject_ref in clear": _set("subject_ref", "1.234.567-8"),
    "subject_ref upper case": _set("subject_ref", "AB" * 32),
}


@pytest.mark.parametrize("name", sorted(REQUEST_MUTATIONS))
def test_decode_request_rejects(name: str) -> None:
    """decode_request rejects an extra/missing/mistyped/malformed field with MALFORMED_ENVELOPE."""
    d = fields_of(make_request())
    REQUEST_MUTATIONS[name](d)
    expect_malformed(envelope.decode_request, canonical.encode(d))


def test_decode_request_names_the_malformed_client() -> None:
    """The rejection of a malformed client id says which identifier part is wrong."""
    d = fields_of(make_request())
    d["client"] = "uy/GOV/BPS/benefits"
    err = expect_malformed(envelope.decode_request, canonical.encode(d))
    assert "instance" in err.message
    assert "malformed" in err.message


@pytest.mark.parametrize(
    ("make", "decode"),
    [
        (make_request, envelope.decode_request),
        (make_response, envelope.decode_response),
    ],
)
def test_decode_rejects_boolean_version(
    make: Callable[[], RequestHeader | ResponseHeader], decode: Callable[[bytes], object]
) -> None:
    """A header whose "v" is the boolean true (not the integer 1) is rejected."""
    d = fields_of(make())
    d["v"] = True
    expect_malformed(decode, canonical.encode(d))


RESPONSE_MUTATIONS: dict[str, Mutation] = {
    "extra field": _set("extra", 1),
    "missing grpc_message": _delete("grpc_message"),
    "missing request_sha256": _delete("request_sha256"),
    "type request": _set("type", "request"),
    "v 2": _set("v", 2),
    "grpc_status string": _set("grpc_status", "0"),
    "grpc_status bool": _set("grpc_status", False),
    "grpc_status negative": _set("grpc_status", -1),
    "grpc_status 17": _set("grpc_status", 17),
    "grpc_status null": _set("grpc_status", None),
    "grpc_message null": _set("grpc_message", None),
    "request digest upper-case": _set("request_sha256", "F" * 64),
    "request digest short": _set("request_sha256", "f" * 63),
    "body digest not hex": _set("body_sha256", "z" * 64),
    "service malformed": _set("service", "UY/GOV/DNIC/identity/person/vX"),
    "sender malformed": _set("sender", "UY/GOV/DNIC"),
    "message_id malformed": _set("message_id", "a b"),
    "created_at malformed": _set("created_at", "2025-06-01 12:00:00.000000Z"),
}


@pytest.mark.parametrize("name", sorted(RESPONSE_MUTATIONS))
def test_decode_response_rejects(name: str) -> None:
    """decode_response rejects an extra/missing/mistyped/malformed field with MALFORMED_ENVELOPE."""
    d = fields_of(make_response())
    RESPONSE_MUTATIONS[name](d)
    expect_malformed(envelope.decode_response, canonical.encode(d))


def test_decode_rejects_header_of_the_other_kind() -> None:
    """A request header is not accepted as a response header, nor the reverse."""
    expect_malformed(envelope.decode_response, make_request().encode())
    expect_malformed(envelope.decode_request, make_response().encode())


@pytest.mark.parametrize("value", [[1], "request", 1, None])
def test_decode_rejects_non_object(value: Any) -> None:
    """Canonical JSON that is not an object is rejected."""
    expect_malformed(envelope.decode_request, canonical.encode(value))
    expect_malformed(envelope.decode_response, canonical.encode(value))


def _pretty(data: bytes) -> bytes:
    return json.dumps(json.loads(data), indent=1, sort_keys=True).encode()


def _unsorted(data: bytes) -> bytes:
    reversed_items = dict(reversed(list(json.loads(data).items())))
    return json.dumps(reversed_items, separators=(",", ":"), ensure_ascii=False).encode()


def _escaped(data: bytes) -> bytes:
    return data.replace(b'"request"', b'"\\u0072equest"').replace(
        b'"response"', b'"\\u0072esponse"'
    )


@pytest.mark.parametrize(
    "transform",
    [
        _pretty,
        _unsorted,
        _escaped,
        lambda b: b + b"\n",
        lambda b: b" " + b,
        lambda b: b.replace(b'"v":1', b'"v":1.0'),
        lambda b: b[:-1],
        lambda b: b"\xff" + b,
    ],
)
@pytest.mark.parametrize(
    ("make", "decode"),
    [
        (make_request, envelope.decode_request),
        (make_response, envelope.decode_response),
    ],
)
def test_decode_rejects_non_canonical_bytes(
    transform: Callable[[bytes], bytes],
    make: Callable[[], RequestHeader | ResponseHeader],
    decode: Callable[[bytes], object],
) -> None:
    """The same header in any other byte form than the canonical one is rejected."""
    data = transform(make().encode())
    assert data != make().encode()
    expect_malformed(decode, data)


# ---- body digest, message id and purpose ----------------------------------------------


def test_check_body_accepts_matching_body() -> None:
    """check_body passes when the body has the digest in the header."""
    envelope.check_body(make_request().body_sha256, BODY)
    envelope.check_body(envelope.sha256_hex(b""), b"")


@pytest.mark.parametrize("body", [BODY + b"\x00", BODY[:-1], b"", bytes([BODY[0] ^ 1]) + BODY[1:]])
def test_check_body_rejects_changed_body(body: bytes) -> None:
    """check_body raises TrustError(BODY_DIGEST_MISMATCH) when the body was altered."""
    with pytest.raises(TrustError) as info:
        envelope.check_body(make_request().body_sha256, body)
    assert info.value.code is Code.BODY_DIGEST_MISMATCH


@pytest.mark.parametrize(
    "value", ["m1", "0f8e4a2c-1b7d-4c3e-9a65-2d1f0e9b8c7a", "urn:uuid:1.2_3", "a" * 128]
)
def test_check_message_id_accepts(value: str) -> None:
    """check_message_id returns a well-formed message id unchanged."""
    assert envelope.check_message_id(value) == value


@pytest.mark.parametrize(
    "value", ["", "-a", ".a", ":a", "a b", "a/b", "a" * 129, "é", "a\n", " a", "a;b"]
)
def test_check_message_id_rejects(value: str) -> None:
    """check_message_id raises RequestError(MALFORMED_IDENTIFIER) for a malformed id."""
    with pytest.raises(RequestError) as info:
        envelope.check_message_id(value)
    assert info.value.code is Code.MALFORMED_IDENTIFIER


@pytest.mark.parametrize("value", ["benefits", "benefit-eligibility.2025_v1", "a" * 64, "7"])
def test_check_purpose_accepts(value: str) -> None:
    """check_purpose returns a well-formed purpose unchanged."""
    assert envelope.check_purpose(value) == value


@pytest.mark.parametrize("value", ["", "-x", "_x", "a b", "a:b", "a/b", "a" * 65, "ñandú", "a\t"])
def test_check_purpose_rejects(value: str) -> None:
    """check_purpose raises RequestError(MALFORMED_IDENTIFIER) for a malformed purpose."""
    with pytest.raises(RequestError) as info:
        envelope.check_purpose(value)
    assert info.value.code is Code.MALFORMED_IDENTIFIER


# ---- properties -----------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_property_decode_arbitrary_bytes_raises_only_gateway_errors(data: bytes) -> None:
    """decode_request/decode_response on arbitrary bytes only ever raise GatewayError subclasses."""
    for decode in (envelope.decode_request, envelope.decode_response):
        with contextlib.suppress(GatewayError):
            decode(data)


json_leaves = st.none() | st.booleans() | st.integers(-5, 20) | st.text(max_size=12)
json_any = st.recursive(
    json_leaves,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
    max_leaves=6,
)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_property_decode_fuzzed_headers_raises_only_gateway_errors(data: st.DataObject) -> None:
    """A canonical header with one field replaced by an arbitrary value decodes or raises GatewayError."""
    kind = data.draw(st.sampled_from(["request", "response"]))
    d = fields_of(make_request() if kind == "request" else make_response())
    key = data.draw(st.sampled_from(sorted(d)))
    d[key] = data.draw(json_any)
    decode = envelope.decode_request if kind == "request" else envelope.decode_response
    codes: list[Code] = []
    try:
        decode(canonical.encode(d))
    except GatewayError as exc:
        codes.append(exc.code)
    assert codes in ([], [Code.MALFORMED_ENVELOPE])


@pytest.mark.parametrize(
    "data", [b'"\\ud800"', b'{"message_id":"\\udfff"}', b"9" * 5000], ids=["hi", "lo", "bigint"]
)
def test_decode_request_peer_bytes_raise_only_trust_error(data: bytes) -> None:
    """Bytes from a peer that hit JSON edge cases are reported as MALFORMED_ENVELOPE."""
    expect_malformed(envelope.decode_request, data)
