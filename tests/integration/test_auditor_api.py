"""The auditor API of real security servers: who may search, what they see, what is logged.

One topology (registry, OCSP responder, TSA, both security servers and the demo backends as
real processes) with real calls from CLINICS (member UY/GOV/MSP) to POPULATION (member
UY/GOV/DNIC): some about data subjects, one refused for its purpose, and enough filler
calls to page through. The tests search both servers' logs over HTTP with registry tokens,
as an auditor would, and through the `gateway audit` command line. A second, separate
topology has its live log edited by an attacker, so that the first one stays intact.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.audit import RECORD_FIELDS, record_hash
from gateway.pseudonym import subject_pseudonym
from gateway_demo.client import call_raw, routing_metadata
from gateway_demo.generated import population_pb2 as population
from gateway_demo.runner import Runner
from gateway_ops.auth import Role as TokenRole
from gateway_ops.auth import TokenIssuer, load_or_create_token_key
from gateway_ops.runtime import read_settings
from registry.main import RegistrySettings, token_issuer
from tests.tamper import tamper_sqlite

from .conftest import CLINICS, DNIC, GET_PERSON, MSP, POPULATION

SUBJECT = "1.234.567-8"
OTHER_SUBJECT = "4.321.765-2"  # both are people the demo population registry knows
ALLOWED = "healthcare-identification"
AGREEMENT = "AGR-2026-0001"
FILLER_CALLS = 26
PATH = "/audit/v1/records"
TIMEOUT = 30.0  # generous: the suite may share this machine with another run


# ---- the topology and its calls --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Call:
    message_id: str
    purpose: str
    subject: str | None
    ok: bool


@dataclass(frozen=True, slots=True)
class World:
    runner: Runner
    calls: tuple[Call, ...]

    @property
    def key(self) -> bytes:
        return self.runner.subject_key().read_bytes()

    @property
    def msp(self) -> str:
        return self.runner.auditor_url(MSP)

    @property
    def dnic(self) -> str:
        return self.runner.auditor_url(DNIC)

    def first(self, subject: str | None, ok: bool = True) -> Call:
        return next(c for c in self.calls if c.subject == subject and c.ok == ok)

    def about(self, subject: str) -> list[Call]:
        return [c for c in self.calls if c.subject == subject]

    def auditor(self, member: str | None = None) -> str:
        name = f"auditor-{member or 'instance'}-{uuid.uuid4().hex[:6]}"
        return self.runner.token("auditor", member=member, subject=name)


async def make_calls(runner: Runner, plan: Sequence[tuple[str, str | None]]) -> list[Call]:
    """One GetPerson call from CLINICS per (purpose, subject), with our own message ids."""
    calls = []
    async with runner.consumer_channel(MSP, CLINICS) as channel:
        for i, (purpose, subject) in enumerate(plan):
            message_id = f"audit-api-{i:02d}-{uuid.uuid4().hex[:12]}"
            body = population.GetPersonRequest(national_id=subject or OTHER_SUBJECT)
            outcome = await call_raw(
                channel,
                GET_PERSON,
                body.SerializeToString(),
                routing_metadata(
                    client=CLINICS,
                    service=POPULATION,
                    purpose=purpose,
                    subject=subject,
                    message_id=message_id,
                ),
            )
            assert outcome.ok == (purpose != "marketing"), outcome
            calls.append(Call(message_id, purpose, subject, outcome.ok))
    return calls


@pytest.fixture(scope="module")
def world(make_runner: Callable[..., Runner]) -> World:
    """The topology with its calls: two about SUBJECT, one about OTHER_SUBJECT, one refused
    (purpose "marketing", about SUBJECT), one about no one, and FILLER_CALLS more."""
    runner = make_runner()
    plan: list[tuple[str, str | None]] = [
        (ALLOWED, SUBJECT),
        (ALLOWED, OTHER_SUBJECT),
        ("marketing", SUBJECT),
        (ALLOWED, None),
        (ALLOWED, SUBJECT),
        *[("benchmark", None)] * FILLER_CALLS,
    ]
    calls = asyncio.run(make_calls(runner, plan))
    return World(runner, tuple(calls))


# ---- HTTP ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: Mapping[str, str]
    body: dict[str, Any]


Params = Mapping[str, str | int] | Sequence[tuple[str, str | int]]


def get(
    base: str,
    params: Params = (),
    *,
    token: str | None = None,
    authorization: str | None = None,
) -> Answer:
    """GET the records endpoint; never raises for an HTTP error status."""
    query = urllib.parse.urlencode(params)
    headers = {"Accept": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if authorization is not None:
        headers["Authorization"] = authorization
    request = urllib.request.Request(base + PATH + ("?" + query if query else ""), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            status, raw, got = response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        status, raw, got = exc.code, exc.read(), dict(exc.headers)
    try:
        body = json.loads(raw)
    except ValueError:
        body = {"raw": raw.decode(errors="replace")}  # such as aiohttp's plain-text 500
    return Answer(status, got, body)


def search(base: str, token: str, params: Params = (), *, page: int = 500) -> list[dict[str, Any]]:
    """Every record matching `params`, following the cursors."""
    found: list[dict[str, Any]] = []
    after: str | None = None
    while True:
        extra: list[tuple[str, str | int]] = [("limit", page)]
        if after is not None:
            extra.append(("after", after))
        pairs = list(params.items()) if isinstance(params, Mapping) else list(params)
        answer = get(base, [*pairs, *extra], token=token)
        assert answer.status == 200, answer
        found += answer.body["records"]
        after = answer.body["next"]
        if after is None:
            return found


def key(r: Mapping[str, Any]) -> tuple[str, str, int]:
    return (r["logged_at"], r["chain"], r["seq"])


# ---- 1. finding one exchange on both servers -------------------------------------------------


def test_instance_auditor_finds_the_exchange_on_both_servers_verified_and_stamped(
    world: World,
) -> None:
    """An instance-wide auditor finds an allowed call by its message id on the consumer's and
    the provider's server: a request and a response on each, every one verified on its own
    with a valid signature, and each covered by a time-stamp within a few seconds."""
    call = world.first(SUBJECT)
    token = world.auditor()
    expected = {
        world.msp: {("request", "consumer"), ("response", "consumer")},
        world.dnic: {("request", "provider"), ("response", "provider")},
    }
    deadline = time.monotonic() + TIMEOUT
    while True:
        found = {url: search(url, token, {"message_id": call.message_id}) for url in expected}
        for url, records in found.items():
            assert {(r["kind"], r["role"]) for r in records} == expected[url], records
            for r in records:
                assert r["message_id"] == call.message_id
                assert (r["client"], r["service"], r["method"]) == (CLINICS, POPULATION, GET_PERSON)
                assert (r["purpose"], r["agreement_id"], r["status"]) == (ALLOWED, AGREEMENT, "ok")
                assert r["verified"] is True and r["problems"] == [], r
                assert r["signature_status"] == "valid", r
                assert base64.b64decode(r["header"]) and base64.b64decode(r["signature"])
                assert r["signer_certificate_sha256"] and r["body_sha256"]
                assert len(r["hash"]) == 64 and len(r["prev_hash"]) == 64
        stamps = [r["timestamp"] for records in found.values() for r in records]
        if all(stamps):
            break
        assert time.monotonic() < deadline, f"not all records were time-stamped: {stamps}"
        time.sleep(0.25)
    for stamp in stamps:
        assert stamp is not None and stamp["gen_time"] and stamp["tsa"]
    # both sides logged the very same signed request and response
    for kind in ("request", "response"):
        consumer = next(r for r in found[world.msp] if r["kind"] == kind)
        provider = next(r for r in found[world.dnic] if r["kind"] == kind)
        for name in ("header", "signature", "body_sha256", "signer_certificate_sha256"):
            assert consumer[name] == provider[name], (kind, name)


def download(base: str, message_id: str, token: str | None) -> tuple[int, bytes, Mapping[str, str]]:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    request = urllib.request.Request(f"{base}/audit/v1/evidence/{message_id}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def test_evidence_bundle_over_the_api_verifies_offline_and_keeps_to_the_scope(
    world: World, tmp_path: Path
) -> None:
    """GET /audit/v1/evidence/{id} answers the zip `gateway audit export` writes, which
    `gateway audit verify-bundle` accepts; a member auditor of neither side and the other
    roles get none, and every request is logged."""
    call = world.first(SUBJECT)
    status, body, headers = download(world.dnic, call.message_id, world.auditor())
    assert status == 200 and headers["Content-Type"] == "application/zip", body[:300]
    assert f"evidence-{call.message_id}.zip" in headers["Content-Disposition"]
    bundle = tmp_path / "bundle.zip"
    bundle.write_bytes(body)
    verified = gateway("audit", "verify-bundle", str(bundle), token=None)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    # the consumer's member may; a member of neither side is told it does not exist
    assert download(world.msp, call.message_id, world.auditor("UY/GOV/MSP"))[0] == 200
    assert download(world.msp, call.message_id, world.auditor("UY/GOV/BPS"))[0] == 404
    assert download(world.msp, "no-such-message", world.auditor())[0] == 404
    admin = world.runner.token("member-admin", member="UY/GOV/MSP", subject="an-admin")
    assert download(world.msp, call.message_id, admin)[0] == 403
    assert download(world.msp, call.message_id, None)[0] == 401
    rows = sqlite3.connect(f"file:{world.runner.log_db(MSP)}?mode=ro", uri=True).execute(
        "SELECT status, purpose FROM message_log WHERE kind = 'audit-query' "
        "AND method = 'GET /audit/v1/evidence/' ORDER BY seq"
    )
    logged = [tuple(r) for r in rows]
    assert ("ok", f"evidence={call.message_id}") in logged
    assert ("refused", f"evidence={call.message_id}") in logged  # the other member's try


# ---- 2. scopes -------------------------------------------------------------------------------


def test_member_auditors_see_only_their_members_exchanges(world: World) -> None:
    """An auditor scoped to the client's member (MSP) or to the service's member (DNIC) sees the
    exchange on both servers; one scoped to a member party to no call (UY/GOV/OTHER, which the
    registry's issuer accepts although it is not in the topology), or to a prefix of a party's
    id (UY/GOV/MS), sees nothing, by message id or unfiltered; every record a scoped auditor
    sees belongs to its member."""
    call = world.first(SUBJECT)
    for member in ("UY/GOV/MSP", "UY/GOV/DNIC"):
        token = world.auditor(member)
        for url in (world.msp, world.dnic):
            by_id = search(url, token, {"message_id": call.message_id})
            assert len(by_id) == 2, (member, url, by_id)
            everything = search(url, token)
            assert {r["message_id"] for r in by_id} <= {r["message_id"] for r in everything}
            for r in everything:
                assert r["client"].startswith(member + "/") or r["service"].startswith(
                    member + "/"
                ), r
    for member in ("UY/GOV/OTHER", "UY/GOV/MS"):
        token = world.auditor(member)
        for url in (world.msp, world.dnic):
            assert search(url, token, {"message_id": call.message_id}) == [], (member, url)
            assert search(url, token) == [], (member, url)


def test_member_auditors_never_see_audit_queries(world: World) -> None:
    """Audit-query records exist (an instance-wide auditor sees them, its own among them), but
    a member's auditor gets none with kind=audit-query, not even its own queries."""
    msp_auditor = world.auditor("UY/GOV/MSP")
    assert search(world.msp, msp_auditor, {"client": CLINICS})  # a logged query
    instance = search(world.msp, world.auditor(), {"kind": "audit-query"})
    assert instance and all(r["kind"] == "audit-query" for r in instance)
    assert any(r["client"] == "UY/GOV/MSP" for r in instance)  # the scoped auditor's queries
    for member in ("UY/GOV/MSP", "UY/GOV/DNIC", "UY/GOV/OTHER"):
        token = world.auditor(member)
        for url in (world.msp, world.dnic):
            assert search(url, token, {"kind": "audit-query"}) == [], (member, url)
            assert search(url, token, {"role": "auditor"}) == [], (member, url)


# ---- 3. tokens -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "scope"),
    [
        ("member-admin", {"member": "UY/GOV/MSP"}),
        ("registry-admin", {}),
        ("security-server", {"server": MSP}),
    ],
)
def test_other_roles_are_forbidden(world: World, role: str, scope: dict[str, str]) -> None:
    """Valid registry tokens of any role but auditor get 403 forbidden, and no records."""
    token = world.runner.token(role, member=scope.get("member"), server=scope.get("server"))
    for url in (world.msp, world.dnic):
        answer = get(url, {"message_id": world.first(SUBJECT).message_id}, token=token)
        assert answer.status == 403, answer
        assert answer.body["error"] == "forbidden"
        assert "auditor" in answer.body["message"]
        assert "records" not in answer.body


def registry_issuer(runner: Runner) -> TokenIssuer:
    """The registry's own token issuer, with its signing key (as `Runner.token` uses it)."""
    settings = read_settings(RegistrySettings, runner.workdir / "registry.toml")
    return token_issuer(settings, runner.workdir)


def forged(runner: Runner, *, same_kid: bool) -> str:
    """A token with a real auditor token's claims, signed ES256 by a key the registry never had."""
    real = runner.token("auditor")
    claims = jwt.decode(real, options={"verify_signature": False})
    kid = jwt.get_unverified_header(real)["kid"] if same_kid else "not-the-registry-key"
    other = ec.generate_private_key(ec.SECP256R1())
    return jwt.encode(claims, other, algorithm="ES256", headers={"kid": kid})


def expired(runner: Runner) -> str:
    """An auditor token signed with the registry's key that expired an hour ago (beyond the
    verifier's 30 s leeway; the issuer refuses a lifetime that is not positive)."""
    return registry_issuer(runner).issue(
        subject="late-auditor",
        role=TokenRole.AUDITOR,
        now=datetime.now(UTC) - timedelta(hours=2),
        ttl=timedelta(hours=1),
    )


def unsigned(runner: Runner) -> str:
    """A real auditor token's claims with `alg: none`."""
    claims = jwt.decode(runner.token("auditor"), options={"verify_signature": False})
    head = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
    body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{head}.{body}."


def wrong_audience(runner: Runner) -> str:
    """Signed with the registry's key, but for another audience."""
    claims = jwt.decode(runner.token("auditor"), options={"verify_signature": False})
    return jwt.encode(
        {**claims, "aud": "somebody-else"},
        load_or_create_token_key(runner.pki / "registry-token.key"),
        algorithm="ES256",
        headers={"kid": registry_issuer(runner).key_id},
    )


UNAUTHENTICATED: dict[str, Callable[[Runner], str | None]] = {
    "no Authorization header": lambda r: None,
    "not a bearer token": lambda r: "Basic YXVkaXRvcjpzZWNyZXQ=",
    "empty bearer token": lambda r: "Bearer ",
    "garbage token": lambda r: "Bearer not.a.token",
    "expired token": lambda r: "Bearer " + expired(r),
    "foreign key, registry's kid": lambda r: "Bearer " + forged(r, same_kid=True),
    "foreign key, unknown kid": lambda r: "Bearer " + forged(r, same_kid=False),
    "alg none": lambda r: "Bearer " + unsigned(r),
    "wrong audience": lambda r: "Bearer " + wrong_audience(r),
}


@pytest.mark.parametrize("case", list(UNAUTHENTICATED))
def test_bad_tokens_are_unauthenticated(world: World, case: str) -> None:
    """Missing, malformed, expired, forged, unsigned or misdirected tokens get 401 with a
    WWW-Authenticate challenge, and no records."""
    authorization = UNAUTHENTICATED[case](world.runner)
    for url in (world.msp, world.dnic):
        answer = get(
            url, {"message_id": world.first(SUBJECT).message_id}, authorization=authorization
        )
        assert answer.status == 401, answer
        assert answer.body["error"] == "unauthenticated"
        assert answer.headers.get("WWW-Authenticate", "").startswith("Bearer"), answer.headers
        assert "records" not in answer.body


# ---- 4. query parameters ---------------------------------------------------------------------


def _cursor(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


BAD_QUERIES: list[tuple[str, list[tuple[str, str]], str]] = [
    ("unknown parameter", [("colour", "red")], "colour"),
    ("repeated parameter", [("client", CLINICS), ("client", CLINICS)], "client"),
    ("empty value", [("purpose", "")], "purpose"),
    ("too long", [("service", "x" * 257)], "service"),
    ("control character", [("message_id", "abc\x01def")], "message_id"),
    ("newline", [("subject", "1.234.567-8\n")], "subject"),
    ("unknown kind", [("kind", "gossip")], "kind"),
    ("unknown role", [("role", "admin")], "role"),
    ("limit zero", [("limit", "0")], "limit"),
    ("limit over the page", [("limit", "501")], "limit"),
    ("limit not a number", [("limit", "ten")], "limit"),
    ("since without a zone", [("since", "2026-01-01T00:00:00")], "since"),
    ("since not a time", [("since", "yesterday")], "since"),
    ("until not a time", [("until", "2026-13-01T00:00:00Z")], "until"),
    (
        "until before since",
        [("since", "2026-01-02T00:00:00Z"), ("until", "2026-01-01T00:00:00Z")],
        "until",
    ),
    (
        "until equal to since",
        [("since", "2026-01-02T00:00:00Z"), ("until", "2026-01-02T00:00:00Z")],
        "until",
    ),
    ("cursor not base64 json", [("after", "!!not-a-cursor!!")], "after"),
    ("cursor of the wrong shape", [("after", _cursor(["a", "b"]))], "after"),
    ("cursor with wrong types", [("after", _cursor([1, "main", "3"]))], "after"),
    # a lone surrogate in the cursor's time or chain was a 500, logged "ok" (found by a
    # red-team review); a NUL, not the log's time form, would be one on PostgreSQL
    ("cursor time with a surrogate", [("after", _cursor(["\ud800", "main", 1]))], "after"),
    (
        "cursor chain with a surrogate",
        [("after", _cursor(["2026-01-01T00:00:00.000000Z", "\udfff", 1]))],
        "after",
    ),
    ("cursor time with a NUL", [("after", _cursor(["2026\x00", "main", 1]))], "after"),
]


@pytest.mark.parametrize(
    ("params", "named"), [(p, n) for _, p, n in BAD_QUERIES], ids=[c for c, _, _ in BAD_QUERIES]
)
def test_bad_parameters_are_refused_naming_them(
    world: World, params: list[tuple[str, str]], named: str
) -> None:
    """A bad query parameter gets 400 bad_request with a message naming the parameter."""
    answer = get(world.msp, params, token=world.auditor())
    assert answer.status == 400, answer
    assert answer.body["error"] == "bad_request"
    assert named in answer.body["message"], answer.body


# values that parse but overflow (they once answered 500 instead of 400)
OVERFLOWING: list[tuple[str, list[tuple[str, str]], str, str]] = [
    (
        "since before year 1 in UTC",
        [("since", "0001-01-01T00:00:00+01:00")],
        "since",
        "_time: astimezone(UTC) raises OverflowError, uncaught: 500, and the query is not logged",
    ),
    (
        "until after year 9999 in UTC",
        [("until", "9999-12-31T23:59:59-01:00")],
        "until",
        "_time: astimezone(UTC) raises OverflowError, uncaught: 500, and the query is not logged",
    ),
    (
        "cursor seq beyond 64 bits",
        [("after", _cursor(["2026-01-01T00:00:00.000000Z", "main", 10**30]))],
        "after",
        "decode_cursor accepts any int; SQLite raises OverflowError in the search, after the "
        "query was logged as ok: 500",
    ),
]


@pytest.mark.parametrize(
    ("params", "named"),
    [pytest.param(p, n, id=case) for case, p, n, _why in OVERFLOWING],
)
def test_overflowing_parameters_are_refused_and_logged(
    world: World, params: list[tuple[str, str]], named: str
) -> None:
    """A time or cursor that parses but is out of range gets 400 naming the parameter (not a
    500), and the query is logged as refused like any other bad query."""
    tag = uuid.uuid4().hex[:8]
    since = datetime.now(UTC).isoformat()
    token = world.runner.token("auditor", subject=f"overflow-{tag}")
    answer = get(world.msp, params, token=token)
    logged = [
        r
        for r in search(world.msp, world.auditor(), {"kind": "audit-query", "since": since})
        if (r["user_id"] or "").startswith(f"overflow-{tag}")
    ]
    assert answer.status == 400, answer
    assert named in answer.body["message"]
    assert [(r["status"], r["error_code"]) for r in logged] == [("refused", "bad_request")]


@pytest.mark.parametrize("name", ["kind", "role", "limit", "since", "(as a name)"])
def test_a_refused_value_is_answered_but_not_kept_in_the_logs(world: World, name: str) -> None:
    """A national id typed into the wrong field (or as a parameter's name) is quoted back to
    the auditor, but neither the audit log's record of the refusal nor the server's log
    keeps it: the subject's identifier is never stored. (Found by a red-team review.)"""
    tag = uuid.uuid4().hex[:8]
    since = datetime.now(UTC).isoformat()
    token = world.runner.token("auditor", subject=f"typo-{tag}")
    identifier = f"9.{tag[:3]}.{tag[3:6]}-1"
    params = {identifier: "1"} if name == "(as a name)" else {name: identifier}
    answer = get(world.msp, params, token=token)
    assert answer.status == 400, answer
    assert identifier in answer.body["message"]
    logged = [
        r
        for r in search(world.msp, world.auditor(), {"kind": "audit-query", "since": since})
        if (r["user_id"] or "").startswith(f"typo-{tag}")
    ]
    assert [(r["status"], r["error_code"]) for r in logged] == [("refused", "bad_request")]
    assert identifier not in json.dumps(logged)
    server_log = (world.runner.workdir / "logs" / "ss-msp.log").read_text(errors="replace")
    assert identifier not in server_log


# ---- 5. keyset pagination --------------------------------------------------------------------


@pytest.mark.parametrize("server", [MSP, DNIC])
def test_pages_cover_everything_once_in_order(world: World, server: str) -> None:
    """Paging with limit=7 returns every record once, in (logged_at, chain, seq) order, the
    same records as one page of 500; every page but the last is full and has a cursor."""
    url, token = world.runner.auditor_url(server), world.auditor()
    whole = get(url, {"limit": 500}, token=token)
    assert whole.status == 200 and whole.body["next"] is None
    everything = whole.body["records"]
    assert len(everything) >= 2 * len([c for c in world.calls if c.ok])
    pages: list[list[dict[str, Any]]] = []
    after: str | None = None
    while True:
        params: list[tuple[str, str | int]] = [("limit", 7)]
        if after is not None:
            params.append(("after", after))
        answer = get(url, params, token=token)
        assert answer.status == 200, answer
        pages.append(answer.body["records"])
        after = answer.body["next"]
        if after is None:
            break
        assert len(pages[-1]) == 7
        assert len(pages) < 100, "pagination does not end"
    paged = [r for page in pages for r in page]
    keys = [key(r) for r in paged]
    assert len(set(keys)) == len(keys), "a record came twice"
    assert keys == sorted(keys)
    assert keys == [key(r) for r in everything]
    assert [r["hash"] for r in paged] == [r["hash"] for r in everything]
    assert len(pages) == -(-len(everything) // 7)


def test_pages_with_filters_and_time_window(world: World) -> None:
    """Filters and a since/until window page the same way: limit=3 over the exchanges of
    SUBJECT's allowed calls gives exactly the unpaged result."""
    token = world.auditor()
    everything = search(world.msp, token, {"purpose": ALLOWED})
    first, last = everything[0]["logged_at"], everything[-1]["logged_at"]
    window = {"purpose": ALLOWED, "since": first, "until": last}
    paged = search(world.msp, token, window, page=3)
    assert [key(r) for r in paged] == [key(r) for r in everything if r["logged_at"] < last]
    assert {r["purpose"] for r in paged} == {ALLOWED}


# ---- 6. data subjects ------------------------------------------------------------------------


def test_subject_search_finds_exactly_its_calls_by_pseudonym(world: World) -> None:
    """subject=ID returns exactly the records of the calls made about ID (allowed and refused,
    on the consumer's and the provider's server), each with subject_ref = HMAC(key, ID)."""
    token = world.auditor()
    for subject in (SUBJECT, OTHER_SUBJECT):
        pseudonym = subject_pseudonym(world.key, subject)
        calls = world.about(subject)
        msp = search(world.msp, token, {"subject": subject})
        dnic = search(world.dnic, token, {"subject": subject})
        assert {r["message_id"] for r in msp} == {c.message_id for c in calls}
        assert {r["message_id"] for r in dnic} == {c.message_id for c in calls if c.ok}
        assert len(msp) == sum(2 if c.ok else 1 for c in calls)
        assert len(dnic) == 2 * sum(1 for c in calls if c.ok)
        for r in msp + dnic:
            assert r["subject_ref"] == pseudonym, r
            assert subject not in json.dumps({k: v for k, v in r.items() if k != "header"})
        refusals = [r for r in msp if r["kind"] == "refusal"]
        assert [r["purpose"] for r in refusals] == ["marketing"] * len(refusals)


def _log_files(db: Path) -> list[Path]:
    """A SQLite log's database file and, when present, its write-ahead log and journal."""
    return [p for p in (db, Path(f"{db}-wal"), Path(f"{db}-journal")) if p.exists()]


def test_subject_identifier_is_not_stored_in_the_logs(world: World) -> None:
    """The signed request headers both servers logged carry the subject's pseudonym, not its
    identifier; and no byte of either log's database files (database and write-ahead log),
    nor of the servers' own process logs, holds the identifier."""
    pseudonym = subject_pseudonym(world.key, SUBJECT)
    token = world.auditor()
    headers = [
        json.loads(base64.b64decode(r["header"]))
        for url in (world.msp, world.dnic)
        for r in search(url, token, {"subject": SUBJECT, "kind": "request"})
    ]
    assert len(headers) == 2 * sum(1 for c in world.about(SUBJECT) if c.ok)
    assert not any(SUBJECT in json.dumps(h) for h in headers)
    for header in headers:
        assert header.get("subject_ref") == pseudonym, header
    process_logs = [
        str(path)
        for name in world.runner.server_names.values()
        if SUBJECT in (path := world.runner.processes[name].log_path).read_text(errors="replace")
    ]
    assert process_logs == []
    leaks = [
        str(path)
        for server in (MSP, DNIC)
        for path in _log_files(world.runner.log_db(server))
        if SUBJECT.encode() in path.read_bytes()
    ]
    assert leaks == [], "the data subject's identifier is stored in clear"


# ---- 7. the queries' own records -------------------------------------------------------------


def test_every_query_is_logged_with_its_outcome(world: World) -> None:
    """Allowed and refused (403, 400) queries of a verified token each leave an audit-query
    record: status, error code, the token's subject, the filters in purpose, and the searched
    subject only as its pseudonym, never in clear; a 401 leaves none (it is only counted)."""
    runner, url = world.runner, world.msp
    tag = uuid.uuid4().hex[:8]
    since = datetime.now(UTC).isoformat()
    ok_token = runner.token("auditor", subject=f"carla-{tag}")
    marker = f"marker-{tag}"
    ok = get(url, {"purpose": marker, "client": CLINICS, "subject": SUBJECT}, token=ok_token)
    assert ok.status == 200 and ok.body["records"] == []
    admin = runner.token("member-admin", member="UY/GOV/MSP", subject=f"admin-{tag}")
    assert get(url, {"subject": SUBJECT}, token=admin).status == 403
    assert get(url, {"subject": SUBJECT}).status == 401
    bad_token = runner.token("auditor", subject=f"careless-{tag}")
    assert get(url, {"subject": SUBJECT, "limit": 0}, token=bad_token).status == 400

    logged = search(url, world.auditor(), {"kind": "audit-query", "since": since})
    assert all(r["kind"] == "audit-query" and r["role"] == "auditor" for r in logged)
    assert all(r["verified"] for r in logged), [r["problems"] for r in logged]

    def one(user: str | None, error: str | None) -> dict[str, Any]:
        mine = [
            r
            for r in logged
            if r["error_code"] == error
            and (r["user_id"] or "").startswith(user or "")
            and (user is not None or r["user_id"] is None)
        ]
        assert len(mine) == 1, (user, error, logged)
        return mine[0]

    allowed = one(f"carla-{tag}", None)
    assert allowed["status"] == "ok"
    assert allowed["client"] == "instance"
    assert urllib.parse.parse_qs(allowed["purpose"]) == {"client": [CLINICS], "purpose": [marker]}
    assert allowed["subject_ref"] == subject_pseudonym(world.key, SUBJECT)
    assert allowed["method"] == f"GET {PATH}"

    forbidden = one(f"admin-{tag}", "forbidden")
    assert forbidden["status"] == "refused"
    assert forbidden["client"] == "UY/GOV/MSP"
    assert not [r for r in logged if r["error_code"] == "unauthenticated"], logged
    bad = one(f"careless-{tag}", "bad_request")
    assert bad["status"] == "refused" and "limit" in bad["error_message"]

    for r in logged:
        assert SUBJECT not in json.dumps(r), r
    # the instance-wide search above is itself logged, with its filters
    again = search(url, world.auditor(), {"kind": "audit-query", "since": since})
    assert any((r["purpose"] or "").startswith("kind=audit-query") for r in again)


# ---- 8. the command line ---------------------------------------------------------------------


def gateway(*args: str, token: str | None) -> subprocess.CompletedProcess[str]:
    """Run `gateway` with the token in GATEWAY_TOKEN (or none at all)."""
    env = {k: v for k, v in os.environ.items() if k != "GATEWAY_TOKEN"}
    if token is not None:
        env["GATEWAY_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "gateway_cli.main", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env=env,
    )


def test_cli_trace_is_consistent(world: World) -> None:
    """`gateway audit trace MID --url A --url B` exits 0 and says both sides agree."""
    call = world.first(SUBJECT)
    result = gateway(
        "audit", "trace", call.message_id, "--url", world.msp, "--url", world.dnic,
        token=world.auditor(),
    )  # fmt: skip
    assert result.returncode == 0, result
    assert "consistent on both sides" in result.stdout
    assert "NOT" not in result.stdout
    assert f"{CLINICS} -> {POPULATION}" in result.stdout and AGREEMENT in result.stdout


def test_cli_subject_report_lists_every_access(world: World) -> None:
    """`gateway audit subject ID --url A --url B --json` lists each call about ID once, with
    its agreement and result: answered (logged by both servers) or refused (by the consumer's)."""
    result = gateway(
        "audit", "subject", SUBJECT, "--url", world.msp, "--url", world.dnic, "--json",
        token=world.auditor(),
    )  # fmt: skip
    assert result.returncode == 0, result
    doc = json.loads(result.stdout)
    accesses = {a["message_id"]: a for a in doc["accesses"]}
    assert set(accesses) == {c.message_id for c in world.about(SUBJECT)}
    for call in world.about(SUBJECT):
        access = accesses[call.message_id]
        assert (access["client"], access["service"]) == (CLINICS, POPULATION)
        assert access["purpose"] == call.purpose and access["verified"] is True
        if call.ok:
            assert access["agreement"] == AGREEMENT
            assert access["result"] == "answered"
            assert access["logged_by"] == [world.msp, world.dnic]
        else:
            assert access["agreement"] is None
            assert access["result"].startswith("refused")
            assert access["logged_by"] == [world.msp]


def test_cli_search_prints_a_table(world: World) -> None:
    """`gateway audit search --url A --message-id MID` prints the request and response."""
    call = world.first(SUBJECT)
    result = gateway(
        "audit", "search", "--url", world.msp, "--message-id", call.message_id,
        token=world.auditor(),
    )  # fmt: skip
    assert result.returncode == 0, result
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["LOGGED", "AT", "RECORD"]
    rows = [line for line in lines[1:] if call.message_id in line]
    assert len(rows) == 2
    assert any(" request " in r for r in rows) and any(" response " in r for r in rows)
    assert all(r.rstrip().endswith("yes") for r in rows)


def test_cli_without_a_token_is_a_usage_error(world: World) -> None:
    """Without --token or GATEWAY_TOKEN the CLI exits 2 saying how to get a token."""
    result = gateway("audit", "search", "--url", world.msp, token=None)
    assert result.returncode == 2, result
    assert "no auditor token" in result.stderr and "GATEWAY_TOKEN" in result.stderr


def test_cli_with_a_member_admin_token_is_forbidden(world: World) -> None:
    """A member-admin token makes the CLI exit 2 with the API's 403 forbidden."""
    token = world.runner.token("member-admin", member="UY/GOV/MSP")
    result = gateway("audit", "trace", "x", "--url", world.msp, "--url", world.dnic, token=token)
    assert result.returncode == 2, result
    assert "403" in result.stderr and "forbidden" in result.stderr


# ---- 9. tampering seen per result (last: it edits the log) ------------------------------------------------------------


@pytest.fixture(scope="module")
def tampered(world: World) -> tuple[Runner, list[Call]]:
    """4 more allowed calls in the topology, whose live MSP log an attacker then edits: the
    request of call 1 altered (hash left), the request of call 2 altered and re-hashed, the
    request of call 3 deleted. Last in this file: the other tests see an intact log."""
    runner = world.runner
    calls = asyncio.run(make_calls(runner, [(ALLOWED, None)] * 4))
    db = runner.log_db(MSP)

    def request(message_id: str) -> dict[str, Any]:
        conn = sqlite3.connect(db)
        try:
            conn.row_factory = sqlite3.Row
            row = conn.execute(
                "SELECT * FROM message_log WHERE message_id = ? AND kind = 'request'",
                (message_id,),
            ).fetchone()
            return dict(row)
        finally:
            conn.close()

    altered, rehashed, deleted = (request(c.message_id) for c in calls[1:4])
    rehashed["purpose"] = "marketing"
    new_hash = record_hash(
        rehashed["seq"], rehashed["prev_hash"], {k: rehashed[k] for k in RECORD_FIELDS}
    )
    tamper_sqlite(
        db,
        (
            "UPDATE message_log SET purpose = 'marketing' WHERE chain = ? AND seq = ?",
            (altered["chain"], altered["seq"]),
        ),
        (
            "UPDATE message_log SET purpose = 'marketing', hash = ? WHERE chain = ? AND seq = ?",
            (new_hash, rehashed["chain"], rehashed["seq"]),
        ),
        (
            "DELETE FROM message_log WHERE chain = ? AND seq = ?",
            (deleted["chain"], deleted["seq"]),
        ),
    )
    return runner, calls


def test_tampered_records_are_flagged_in_results(tampered: tuple[Runner, list[Call]]) -> None:
    """On a live log edited behind the server's back, the API flags each result on its own:
    an altered record as altered, the record after a re-hashed edit as not linking, the
    record after a deleted one as missing its predecessor; untouched records still verify,
    and the CLI's search exits 1."""
    runner, calls = tampered
    url = runner.auditor_url(MSP)
    token = runner.token("auditor")

    def records(call: Call) -> dict[str, dict[str, Any]]:
        found = search(url, token, {"message_id": call.message_id})
        return {r["kind"]: r for r in found}

    intact = records(calls[0])
    assert all(r["verified"] for r in intact.values()), intact

    altered = records(calls[1])
    assert altered["request"]["purpose"] == "marketing"
    assert altered["request"]["verified"] is False
    assert any("altered" in p for p in altered["request"]["problems"]), altered["request"]
    assert altered["request"]["signature_status"] == "valid"  # the header was not touched
    assert altered["response"]["verified"] is True  # its link to the stored hash holds

    rehashed = records(calls[2])
    assert rehashed["request"]["verified"] is True  # consistent on its own...
    assert rehashed["request"]["purpose"] == "marketing"
    follower = rehashed["response"]
    assert follower["seq"] == rehashed["request"]["seq"] + 1, "the next record is not the response"
    assert follower["verified"] is False
    assert any("link" in p for p in follower["problems"]), follower  # ...but the next is not

    deleted = records(calls[3])
    assert set(deleted) == {"response"}
    assert deleted["response"]["verified"] is False
    assert any("missing" in p for p in deleted["response"]["problems"]), deleted["response"]

    result = gateway(
        "audit", "search", "--url", url, "--message-id", calls[1].message_id, token=token
    )
    assert result.returncode == 1, result
    assert "NO: its content does not match" in result.stdout, result.stdout
    assert "1 record(s) do NOT verify" in result.stderr
