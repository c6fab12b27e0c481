"""Unit tests of gateway.errors: stable codes and their one mapping to a gRPC status."""

from __future__ import annotations

import re

import pytest

from gateway.errors import (
    STATUS_BY_CODE,
    AuditError,
    AuthorizationError,
    Code,
    ConfigurationError,
    GatewayError,
    IdentifierError,
    RequestError,
    Status,
    TrustError,
    UnavailableError,
)

SNAKE = re.compile(r"[a-z]+(?:_[a-z]+)*")


@pytest.mark.parametrize("code", list(Code))
def test_every_code_has_a_status(code: Code) -> None:
    """Every Code maps to a Status in STATUS_BY_CODE."""
    assert isinstance(STATUS_BY_CODE[code], Status)


def test_mapping_has_no_stray_keys() -> None:
    """STATUS_BY_CODE maps exactly the members of Code."""
    assert set(STATUS_BY_CODE) == set(Code)


def test_codes_are_unique() -> None:
    """No two Code names share a value (an alias would silently merge two codes)."""
    values = [member.value for member in Code.__members__.values()]
    assert len(values) == len(set(values))
    assert len(Code.__members__) == len(Code)


@pytest.mark.parametrize("code", list(Code))
def test_codes_are_lowercase_snake(code: Code) -> None:
    """Every code value is a lowercase snake_case string."""
    assert isinstance(code.value, str)
    assert SNAKE.fullmatch(code.value), code.value


def test_statuses_are_grpc_status_names() -> None:
    """Every Status value is its own upper-case name, as grpc.StatusCode spells it."""
    for status in Status:
        assert status.value == status.name


@pytest.mark.parametrize(
    ("cls", "code"),
    [
        (GatewayError, Code.INTERNAL),
        (IdentifierError, Code.MALFORMED_IDENTIFIER),
        (AuditError, Code.AUDIT_CHAIN_BROKEN),
    ],
)
def test_default_codes(cls: type[GatewayError], code: Code) -> None:
    """Error classes carry their default code and its status."""
    err = cls("what happened")
    assert err.code is code
    assert err.status is STATUS_BY_CODE[code]
    assert err.message == "what happened"
    assert str(err) == "what happened"


def test_explicit_code_overrides_default() -> None:
    """A code passed to the constructor overrides the class default on that instance only."""
    err = TrustError("bad", code=Code.BAD_SIGNATURE)
    assert err.code is Code.BAD_SIGNATURE
    assert err.status is Status.UNAUTHENTICATED
    assert TrustError("other").code is Code.INTERNAL
    assert repr(err) == "TrustError(code='bad_signature', message='bad')"


def test_hierarchy() -> None:
    """The error groups are GatewayError subclasses; IdentifierError is a RequestError."""
    for cls in (RequestError, AuthorizationError, TrustError, ConfigurationError, UnavailableError):
        assert issubclass(cls, GatewayError)
    assert issubclass(IdentifierError, RequestError)
    assert issubclass(AuditError, GatewayError)
