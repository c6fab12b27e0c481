"""What auditors read from the security servers' auditor APIs, put together: the report
of one data subject's accesses and the comparison of one exchange's records on both sides.

Used by `gateway audit subject | trace` and by the registry console's auditor pages. Both
take (server, record) pairs as the auditor API returns them (`security_server.search`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# what both sides of one exchange must have logged alike
SIGNED_FIELDS = ("header", "signature", "body_sha256", "signer_certificate_sha256")


@dataclass
class Access:
    """One exchange about the subject, as the servers logged it."""

    message_id: str
    time: str = ""
    client: str | None = None
    service: str | None = None
    purpose: str | None = None
    agreement: str | None = None
    # ("refused", code), ("answered", "ok"), ("answered", status) or ("none", "")
    outcome: tuple[str, str] = ("none", "")
    seen_by: list[str] = field(default_factory=list)
    verified: bool = True

    @property
    def result(self) -> str:
        kind, detail = self.outcome
        if kind == "refused":
            return f"refused: {detail}"
        if kind == "answered":
            return "answered" if detail == "ok" else f"answered with {detail}"
        return "no answer logged"

    def doc(self) -> dict[str, Any]:
        return {
            "message_id": self.message_id,
            "time": self.time,
            "client": self.client,
            "service": self.service,
            "purpose": self.purpose,
            "agreement": self.agreement,
            "result": self.result,
            "logged_by": self.seen_by,
            "verified": self.verified,
        }


def outcome_of(r: dict[str, Any]) -> tuple[str, str] | None:
    """What one record says of the exchange's result, if anything."""
    if r["kind"] == "refusal" or r["status"] == "error":
        return ("refused", str(r["error_code"] or r["status"]))
    if r["kind"] == "response":
        return ("answered", str(r["status"]))
    return None


def subject_report(found: Sequence[tuple[str, dict[str, Any]]]) -> list[Access]:
    """Accesses per message id, from (server, record) pairs; the provider's view of the
    result wins, as the provider decided."""
    accesses: dict[str, Access] = {}
    ranked: dict[str, int] = {}
    for server, r in sorted(found, key=lambda p: p[1]["logged_at"]):
        a = accesses.setdefault(r["message_id"] or "-", Access(message_id=r["message_id"] or "-"))
        if not a.time:
            a.time = r["logged_at"]
        for name in ("client", "service", "purpose"):
            if getattr(a, name) is None:
                setattr(a, name, r[name])
        a.agreement = a.agreement or r.get("agreement_id")
        if server not in a.seen_by:
            a.seen_by.append(server)
        a.verified = a.verified and bool(r["verified"])
        outcome = outcome_of(r)
        rank = 2 if r["role"] == "provider" else 1
        if outcome is not None and rank >= ranked.get(a.message_id, 0):
            a.outcome = outcome
            ranked[a.message_id] = rank
    return sorted(accesses.values(), key=lambda a: a.time)


@dataclass(frozen=True, slots=True)
class SideCheck:
    """Whether the consumer and the provider logged one signed message (`kind`: request or
    response) alike: `missing` names a side without it, `differ` the fields that differ."""

    kind: str
    missing: str | None = None
    differ: tuple[str, ...] = ()
    body_sha256: str = ""

    @property
    def ok(self) -> bool:
        return self.missing is None and not self.differ


def compare_sides(found: Sequence[tuple[str, dict[str, Any]]]) -> list[SideCheck]:
    checks = []
    # a stream's close of its request direction, when the exchange was a stream
    streamed = any(r["kind"] == "stream-close" for _, r in found)
    for kind in ("request", "stream-close", "response") if streamed else ("request", "response"):
        by_role = {
            r["role"]: r for _, r in found if r["kind"] == kind and r.get("header") is not None
        }
        consumer, provider = by_role.get("consumer"), by_role.get("provider")
        if consumer is None or provider is None:
            checks.append(SideCheck(kind, missing="consumer" if consumer is None else "provider"))
            continue
        differ = tuple(n for n in SIGNED_FIELDS if consumer[n] != provider[n])
        checks.append(SideCheck(kind, differ=differ, body_sha256=str(consumer["body_sha256"])))
    return checks


def trace_checks(found: Sequence[tuple[str, dict[str, Any]]]) -> list[tuple[bool, str]]:
    """What both sides must agree on (each signed header, its signature and body digest),
    and every record's own verification, as (ok, text)."""
    checks: list[tuple[bool, str]] = []
    for c in compare_sides(found):
        if c.missing is not None:
            checks.append(
                (False, f"{c.kind}: the {c.missing}'s signed {c.kind} is not among the records")
            )
        elif c.differ:
            checks.append(
                (False, f"{c.kind}: consumer and provider logged different {', '.join(c.differ)}")
            )
        else:
            checks.append(
                (
                    True,
                    f"{c.kind}: consumer and provider logged the same signed header, signature "
                    f"and body digest ({c.body_sha256[:16]}…)",
                )
            )
    for server, r in found:
        if not r["verified"]:
            checks.append(
                (
                    False,
                    f"{server} {r['chain']}#{r['seq']}: does not verify: {'; '.join(r['problems'])}",
                )
            )
    return checks
