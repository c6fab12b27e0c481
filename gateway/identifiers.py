"""Identifiers of members, subsystems, services and security servers.

The forms follow X-Road so that people who know it feel at home:

    member           INSTANCE/CLASS/CODE                  UY/GOV/DNIC
    subsystem        INSTANCE/CLASS/CODE/SUBSYSTEM        UY/GOV/DNIC/identity
    service          SUBSYSTEM-ID/SERVICE[/VERSION]       UY/GOV/DNIC/identity/person/v1
    security server  INSTANCE/CLASS/CODE/SERVERCODE       UY/GOV/DNIC/ss1

Parsing is strict: every malformed form raises `IdentifierError` with a message naming
the part that is wrong and the form it should have. Nothing here is lenient about case or
whitespace, because identifiers are compared byte for byte in agreements and logs.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from typing import Self

from gateway.errors import IdentifierError, quote

# ISO 3166-1 alpha-2 country code, optionally with an environment suffix: UY, UY-TEST.
_INSTANCE = re.compile(r"[A-Z]{2}(?:-[A-Z0-9]{1,16})?")
_CLASS = re.compile(r"[A-Z]{2,16}")
_CODE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,63})")
_VERSION = re.compile(r"v?[0-9]+(?:\.[0-9]+){0,2}")

_CODE_RULE = "1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"

_PART_RULES: dict[str, tuple[re.Pattern[str], str]] = {
    "instance": (
        _INSTANCE,
        "an ISO 3166 country code in capitals, optionally with a suffix (UY, UY-TEST)",
    ),
    "member class": (_CLASS, "2 to 16 capital letters (GOV, COM, NGO)"),
    "member code": (_CODE, _CODE_RULE),
    "subsystem code": (_CODE, _CODE_RULE),
    "service code": (_CODE, _CODE_RULE),
    "server code": (_CODE, _CODE_RULE),
    "service version": (_VERSION, "a version such as v1 or 2.1"),
}


def _check(kind: str, part: str, value: str, text: str) -> str:
    pattern, rule = _PART_RULES[part]
    if not pattern.fullmatch(value):
        shown = quote(value) if value else "empty"
        raise IdentifierError(f"{kind} {quote(text)}: the {part} is {shown}; it must be {rule}")
    return value


@functools.lru_cache(maxsize=8192)
def _parse_cached(cls: type[_Identifier], text: str) -> _Identifier:
    return cls._parse(text)


class _Identifier:
    """What every identifier class offers: a strict, cached `parse`."""

    __slots__ = ()

    @classmethod
    def _parse(cls, text: str) -> Self:
        raise NotImplementedError

    @classmethod
    def parse(cls, text: str) -> Self:
        """Parse the text form strictly; `IdentifierError` names what is wrong.

        Identifiers are immutable values, so parses are cached: the same few identifiers
        arrive on every message.
        """
        if not isinstance(text, str):
            raise IdentifierError(f"identifier must be text, not {type(text).__name__}")
        return _parse_cached(cls, text)  # type: ignore[arg-type,return-value]


def _member(kind: str, parts: list[str], text: str) -> MemberId:
    return MemberId(
        instance=_check(kind, "instance", parts[0], text),
        member_class=_check(kind, "member class", parts[1], text),
        code=_check(kind, "member code", parts[2], text),
    )


def _split(kind: str, text: str, form: str, counts: tuple[int, ...]) -> list[str]:
    if not isinstance(text, str) or not text:
        raise IdentifierError(f"{kind} is empty; expected the form {form}")
    if text != text.strip():
        raise IdentifierError(f"{kind} {quote(text)} has surrounding whitespace; expected {form}")
    parts = text.split("/")
    if len(parts) not in counts:
        raise IdentifierError(
            f"{kind} {quote(text)} has {len(parts)} part(s) separated by '/'; expected the form "
            f"{form}"
        )
    return parts


@dataclass(frozen=True, slots=True, kw_only=True, order=True)
class MemberId(_Identifier):
    """An organisation registered in an instance."""

    instance: str
    member_class: str
    code: str

    FORM = "INSTANCE/CLASS/CODE"

    @classmethod
    def _parse(cls, text: str) -> Self:
        kind = "member id"
        p = _split(kind, text, cls.FORM, (3,))
        m = _member(kind, p, text)
        return cls(instance=m.instance, member_class=m.member_class, code=m.code)

    def __str__(self) -> str:
        return f"{self.instance}/{self.member_class}/{self.code}"


@dataclass(frozen=True, slots=True, kw_only=True, order=True)
class SubsystemId(_Identifier):
    """The unit of a member that calls and provides services."""

    member: MemberId
    code: str

    FORM = "INSTANCE/CLASS/CODE/SUBSYSTEM"

    @classmethod
    def _parse(cls, text: str) -> Self:
        kind = "subsystem id"
        p = _split(kind, text, cls.FORM, (4,))
        member = _member(kind, p, text)
        return cls(member=member, code=_check(kind, "subsystem code", p[3], text))

    @property
    def instance(self) -> str:
        return self.member.instance

    def __str__(self) -> str:
        return f"{self.member}/{self.code}"


@dataclass(frozen=True, slots=True, kw_only=True, order=True)
class ServiceId(_Identifier):
    """A service offered by a subsystem, optionally versioned."""

    subsystem: SubsystemId
    code: str
    version: str | None = None

    FORM = "INSTANCE/CLASS/CODE/SUBSYSTEM/SERVICE[/VERSION]"

    @classmethod
    def _parse(cls, text: str) -> Self:
        kind = "service id"
        p = _split(kind, text, cls.FORM, (5, 6))
        member = _member(kind, p, text)
        subsystem = SubsystemId(member=member, code=_check(kind, "subsystem code", p[3], text))
        version = _check(kind, "service version", p[5], text) if len(p) == 6 else None
        return cls(
            subsystem=subsystem, code=_check(kind, "service code", p[4], text), version=version
        )

    @property
    def member(self) -> MemberId:
        return self.subsystem.member

    def __str__(self) -> str:
        base = f"{self.subsystem}/{self.code}"
        return f"{base}/{self.version}" if self.version else base


@dataclass(frozen=True, slots=True, kw_only=True, order=True)
class SecurityServerId(_Identifier):
    """A security server, owned by one member."""

    owner: MemberId
    code: str

    FORM = "INSTANCE/CLASS/CODE/SERVERCODE"

    @classmethod
    def _parse(cls, text: str) -> Self:
        kind = "security server id"
        p = _split(kind, text, cls.FORM, (4,))
        owner = _member(kind, p, text)
        return cls(owner=owner, code=_check(kind, "server code", p[3], text))

    def __str__(self) -> str:
        return f"{self.owner}/{self.code}"


# the domain of every security server's verified TLS name (`server_dns_name`): reserved,
# no certificate names a host in it but the server it belongs to
SERVER_NAME_DOMAIN = ".server.gateway.invalid"


def server_dns_name(server: SecurityServerId) -> str:
    """The DNS name in a security server's authentication certificate.

    Identifiers contain '/' and may contain '.', so they cannot be host names; a digest of
    the identifier gives every server a unique name that TLS host-name checks can match.
    """
    return f"s-{hashlib.sha256(str(server).encode()).hexdigest()[:40]}{SERVER_NAME_DOMAIN}"
