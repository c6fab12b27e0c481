"""Unit tests of gateway.identifiers: strict parsing and exact round-trips."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import Code, IdentifierError, RequestError, Status, quote
from gateway.identifiers import MemberId, SecurityServerId, ServiceId, SubsystemId

IdClass = type[MemberId] | type[SubsystemId] | type[ServiceId] | type[SecurityServerId]
ALL_CLASSES: tuple[IdClass, ...] = (MemberId, SubsystemId, ServiceId, SecurityServerId)

CODE_64 = "a" * 64
CODE_65 = "a" * 65


# ---- valid forms ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "UY/GOV/DNIC",
        "UY-TEST/COM/acme",
        "UY-T3ST/NGO/a.b_c-d",
        "AR/GOVERNMENTAGENCY/7",
        f"UY/GOV/{CODE_64}",
    ],
)
def test_member_id_round_trips(text: str) -> None:
    """A valid member id parses and prints back to the same text."""
    assert str(MemberId.parse(text)) == text


def test_member_id_parts() -> None:
    """MemberId.parse splits instance, class and code."""
    assert MemberId.parse("UY/GOV/DNIC") == MemberId(instance="UY", member_class="GOV", code="DNIC")


@pytest.mark.parametrize("text", ["UY/GOV/DNIC/identity", f"UY-TEST/COM/acme/{CODE_64}"])
def test_subsystem_id_round_trips(text: str) -> None:
    """A valid subsystem id parses and prints back to the same text."""
    assert str(SubsystemId.parse(text)) == text


def test_subsystem_id_parts() -> None:
    """SubsystemId.parse yields its member and its own code."""
    sub = SubsystemId.parse("UY/GOV/DNIC/identity")
    assert sub.member == MemberId.parse("UY/GOV/DNIC")
    assert sub.code == "identity"
    assert sub.instance == "UY"


@pytest.mark.parametrize(
    "text",
    [
        "UY/GOV/DNIC/identity/person",
        "UY/GOV/DNIC/identity/person/v1",
        "UY/GOV/DNIC/identity/person/2.1",
        "UY/GOV/DNIC/identity/person/v1.2.3",
        "UY/GOV/DNIC/identity/person/10",
    ],
)
def test_service_id_round_trips(text: str) -> None:
    """A valid service id, with or without version, parses and prints back to the same text."""
    assert str(ServiceId.parse(text)) == text


def test_service_id_without_version() -> None:
    """A five-part service id has no version."""
    svc = ServiceId.parse("UY/GOV/DNIC/identity/person")
    assert svc.version is None
    assert svc.code == "person"
    assert svc.subsystem == SubsystemId.parse("UY/GOV/DNIC/identity")
    assert svc.member == MemberId.parse("UY/GOV/DNIC")


def test_service_id_with_version() -> None:
    """A six-part service id carries its version, and differs from the unversioned one."""
    svc = ServiceId.parse("UY/GOV/DNIC/identity/person/v1")
    assert svc.version == "v1"
    assert svc.code == "person"
    assert svc != ServiceId.parse("UY/GOV/DNIC/identity/person")


@pytest.mark.parametrize("text", ["UY/GOV/DNIC/ss1", "UY-TEST/COM/acme/server.01"])
def test_security_server_id_round_trips(text: str) -> None:
    """A valid security server id parses and prints back to the same text."""
    assert str(SecurityServerId.parse(text)) == text


def test_security_server_id_parts() -> None:
    """SecurityServerId.parse yields its owner member and its server code."""
    ss = SecurityServerId.parse("UY/GOV/DNIC/ss1")
    assert ss.owner == MemberId.parse("UY/GOV/DNIC")
    assert ss.code == "ss1"


def test_identifiers_are_hashable_and_compare_by_value() -> None:
    """Parsed identifiers compare and hash by value (they are dictionary keys elsewhere)."""
    a = SubsystemId.parse("UY/GOV/DNIC/identity")
    b = SubsystemId.parse("UY/GOV/DNIC/identity")
    assert a == b
    assert {a: 1}[b] == 1


# ---- malformed forms ------------------------------------------------------------------


def _expect_malformed(cls: IdClass, text: str) -> IdentifierError:
    with pytest.raises(IdentifierError) as info:
        cls.parse(text)
    err = info.value
    assert err.code is Code.MALFORMED_IDENTIFIER
    assert err.status is Status.INVALID_ARGUMENT
    assert isinstance(err, RequestError)
    return err


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_empty_string_is_rejected(cls: IdClass) -> None:
    """An empty identifier is rejected, saying it is empty."""
    err = _expect_malformed(cls, "")
    assert "empty" in err.message


@pytest.mark.parametrize("cls", ALL_CLASSES)
@pytest.mark.parametrize("pad", [(" ", ""), ("", " "), ("\t", ""), ("", "\n"), (" ", " ")])
def test_surrounding_whitespace_is_rejected(cls: IdClass, pad: tuple[str, str]) -> None:
    """Whitespace around an otherwise valid identifier is rejected, naming the whitespace."""
    valid = {
        MemberId: "UY/GOV/DNIC",
        SubsystemId: "UY/GOV/DNIC/identity",
        ServiceId: "UY/GOV/DNIC/identity/person/v1",
        SecurityServerId: "UY/GOV/DNIC/ss1",
    }[cls]
    err = _expect_malformed(cls, pad[0] + valid + pad[1])
    assert "whitespace" in err.message


@pytest.mark.parametrize(
    ("cls", "text", "count"),
    [
        (MemberId, "UY", 1),
        (MemberId, "UY/GOV", 2),
        (MemberId, "UY/GOV/DNIC/identity", 4),
        (SubsystemId, "UY/GOV/DNIC", 3),
        (SubsystemId, "UY/GOV/DNIC/identity/person", 5),
        (ServiceId, "UY/GOV/DNIC/identity", 4),
        (ServiceId, "UY/GOV/DNIC/identity/person/v1/extra", 7),
        (SecurityServerId, "UY/GOV/DNIC", 3),
        (SecurityServerId, "UY/GOV/DNIC/ss1/x", 5),
        (MemberId, "UY/GOV/DNIC/", 4),
        (MemberId, "/UY/GOV/DNIC", 4),
    ],
)
def test_wrong_number_of_parts_is_rejected(cls: IdClass, text: str, count: int) -> None:
    """An identifier with the wrong number of '/'-separated parts is rejected, with the count."""
    err = _expect_malformed(cls, text)
    assert f"{count} part(s)" in err.message
    assert cls.FORM in err.message


@pytest.mark.parametrize(
    ("cls", "text", "part", "bad"),
    [
        # instance
        (MemberId, "uy/GOV/DNIC", "instance", "uy"),
        (SubsystemId, "uy/GOV/DNIC/identity", "instance", "uy"),
        (ServiceId, "uy/GOV/DNIC/identity/person", "instance", "uy"),
        (SecurityServerId, "uy/GOV/DNIC/ss1", "instance", "uy"),
        (MemberId, "URY/GOV/DNIC", "instance", "URY"),
        (MemberId, "UY-/GOV/DNIC", "instance", "UY-"),
        (MemberId, "UY-test/GOV/DNIC", "instance", "UY-test"),
        # member class
        (MemberId, "UY/gov/DNIC", "member class", "gov"),
        (SubsystemId, "UY/gov/DNIC/identity", "member class", "gov"),
        (ServiceId, "UY/gov/DNIC/identity/person", "member class", "gov"),
        (SecurityServerId, "UY/gov/DNIC/ss1", "member class", "gov"),
        (MemberId, "UY/G/DNIC", "member class", "G"),
        (MemberId, "UY/G0V/DNIC", "member class", "G0V"),
        (MemberId, "UY/ABCDEFGHIJKLMNOPQ/DNIC", "member class", "ABCDEFGHIJKLMNOPQ"),
        # member code
        (MemberId, "UY/GOV/DN IC", "member code", "DN IC"),
        (MemberId, "UY/GOV/-DNIC", "member code", "-DNIC"),
        (MemberId, "UY/GOV/.DNIC", "member code", ".DNIC"),
        (MemberId, "UY/GOV/DNIC!", "member code", "DNIC!"),
        (MemberId, "UY/GOV/DNÍC", "member code", "DNÍC"),
        (MemberId, f"UY/GOV/{CODE_65}", "member code", CODE_65),
        (SubsystemId, "UY/GOV/-DNIC/identity", "member code", "-DNIC"),
        # subsystem code
        (SubsystemId, "UY/GOV/DNIC/iden tity", "subsystem code", "iden tity"),
        (SubsystemId, "UY/GOV/DNIC/-identity", "subsystem code", "-identity"),
        (SubsystemId, f"UY/GOV/DNIC/{CODE_65}", "subsystem code", CODE_65),
        (ServiceId, "UY/GOV/DNIC/-identity/person", "subsystem code", "-identity"),
        # service code
        (ServiceId, "UY/GOV/DNIC/identity/per son", "service code", "per son"),
        (ServiceId, "UY/GOV/DNIC/identity/-person", "service code", "-person"),
        (ServiceId, f"UY/GOV/DNIC/identity/{CODE_65}/v1", "service code", CODE_65),
        # service version
        (ServiceId, "UY/GOV/DNIC/identity/person/vX", "service version", "vX"),
        (ServiceId, "UY/GOV/DNIC/identity/person/V1", "service version", "V1"),
        (ServiceId, "UY/GOV/DNIC/identity/person/v1.2.3.4", "service version", "v1.2.3.4"),
        (ServiceId, "UY/GOV/DNIC/identity/person/v", "service version", "v"),
        (ServiceId, "UY/GOV/DNIC/identity/person/1.", "service version", "1."),
        # server code
        (SecurityServerId, "UY/GOV/DNIC/ss 1", "server code", "ss 1"),
        (SecurityServerId, "UY/GOV/DNIC/-ss1", "server code", "-ss1"),
        (SecurityServerId, f"UY/GOV/DNIC/{CODE_65}", "server code", CODE_65),
    ],
)
def test_malformed_part_is_rejected_and_named(cls: IdClass, text: str, part: str, bad: str) -> None:
    """A malformed part is rejected with a message naming that part and its bad value."""
    err = _expect_malformed(cls, text)
    assert f"the {part} is {quote(bad)}" in err.message
    assert quote(text) in err.message


@pytest.mark.parametrize(
    ("cls", "text", "part"),
    [
        (MemberId, "/GOV/DNIC", "instance"),
        (MemberId, "UY//DNIC", "member class"),
        (MemberId, "UY/GOV/", "member code"),
        (SubsystemId, "UY/GOV/DNIC/", "subsystem code"),
        (ServiceId, "UY/GOV/DNIC/identity/", "service code"),
        (ServiceId, "UY/GOV/DNIC/identity/person/", "service version"),
        (SecurityServerId, "UY/GOV/DNIC/", "server code"),
    ],
)
def test_empty_part_is_rejected_and_named(cls: IdClass, text: str, part: str) -> None:
    """An empty part between slashes is rejected, naming the part as empty."""
    err = _expect_malformed(cls, text)
    assert f"the {part} is empty" in err.message


def test_codes_of_64_characters_are_the_maximum() -> None:
    """Codes of exactly 64 characters are accepted in every code position."""
    text = f"UY/GOV/{CODE_64}/{CODE_64}/{CODE_64}/v1"
    assert str(ServiceId.parse(text)) == text
    assert str(SecurityServerId.parse(f"UY/GOV/{CODE_64}/{CODE_64}")) == (
        f"UY/GOV/{CODE_64}/{CODE_64}"
    )


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_non_string_is_rejected(cls: IdClass) -> None:
    """A value that is not a string (e.g. None from a JSON document) raises IdentifierError."""
    with pytest.raises(IdentifierError):
        cls.parse(None)  # type: ignore[arg-type]


# ---- properties -----------------------------------------------------------------------

instances = st.from_regex(r"[A-Z]{2}(?:-[A-Z0-9]{1,16})?", fullmatch=True)
classes = st.from_regex(r"[A-Z]{2,16}", fullmatch=True)
codes = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", fullmatch=True)
versions = st.from_regex(r"v?[0-9]+(?:\.[0-9]+){0,2}", fullmatch=True)
members = st.builds(lambda i, c, m: f"{i}/{c}/{m}", instances, classes, codes)


@settings(max_examples=150, deadline=None)
@given(members)
def test_property_member_round_trip(text: str) -> None:
    """For generated valid parts, str(MemberId.parse(x)) == x."""
    assert str(MemberId.parse(text)) == text


@settings(max_examples=150, deadline=None)
@given(members, codes)
def test_property_subsystem_and_server_round_trip(member: str, code: str) -> None:
    """For generated valid parts, subsystem and server ids print back to their text."""
    text = f"{member}/{code}"
    assert str(SubsystemId.parse(text)) == text
    assert str(SecurityServerId.parse(text)) == text


@settings(max_examples=150, deadline=None)
@given(members, codes, codes, st.none() | versions)
def test_property_service_round_trip(
    member: str, subsystem: str, service: str, version: str | None
) -> None:
    """For generated valid parts, str(ServiceId.parse(x)) == x, with or without version."""
    text = f"{member}/{subsystem}/{service}" + ("" if version is None else f"/{version}")
    parsed = ServiceId.parse(text)
    assert str(parsed) == text
    assert parsed.version == version


near_identifiers = st.text(alphabet="UYGOVDNICuyv1.-_/ \t\n!é", max_size=40)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(max_size=80), near_identifiers))
def test_property_parse_only_raises_identifier_error(text: str) -> None:
    """On arbitrary text, parse either succeeds (and round-trips) or raises IdentifierError."""
    codes: list[Code] = []
    for cls in ALL_CLASSES:
        try:
            parsed = cls.parse(text)
        except IdentifierError as exc:
            codes.append(exc.code)
            continue
        assert str(parsed) == text
    assert all(code is Code.MALFORMED_IDENTIFIER for code in codes)
