"""The registry's web console, in-process: a real store (SQLite) seeded with the demo
topology, the real governance, token issuer and verifier, and the console's aiohttp
application mounted on the admin API's as `gateway registry serve` mounts it, spoken to
over loopback HTTP.

Sign-in and its cookies, CSRF, roles and member scopes (pages, forms and direct POSTs),
expiry, the approval workflow through the console (the same admin log entries as the
API), and every page in each of the three languages with no string left untranslated.
"""

from __future__ import annotations

import asyncio
import html
import re
import shutil
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from structlog.testing import capture_logs

from certs.pki import init_pki, issue, load_issued
from gateway.agreements import AgreementState, LegalBasis, LegalBasisKind
from gateway.identifiers import MemberId, SecurityServerId, ServiceId, SubsystemId
from gateway.settings import database_url
from gateway.workflow import Policy
from gateway_demo.runner import TEMPLATE, reserve_port
from gateway_ops.auth import Principal, Role, TokenIssuer, TokenVerifier
from registry.api import AdminApi
from registry.console import SECURITY_HEADERS, SESSION_COOKIE, SIGNIN_COOKIE, Console
from registry.console.text import LANGUAGES, TEXT
from registry.governance import AgreementRequest, Governance
from registry.store import RegistryStore
from registry.topology import load_topology
from tests.integration.conftest import keep_cookies

MSP, DNIC, BPS = (MemberId.parse(m) for m in ("UY/GOV/MSP", "UY/GOV/DNIC", "UY/GOV/BPS"))
VACCINATION = ServiceId.parse("UY/GOV/MSP/clinics/vaccination/v1")
POPULATION = ServiceId.parse("UY/GOV/DNIC/identity/population/v1")
SESSION_SECONDS = 600.0


@dataclass
class Clock:
    now: datetime = field(default_factory=lambda: datetime.now(UTC).replace(microsecond=0))

    def __call__(self) -> datetime:
        return self.now


@dataclass
class World:
    client: TestClient[Any, Any]
    gov: Governance
    issuer: TokenIssuer
    clock: Clock
    pending: str  # DNIC asks for the vaccination register: waits for MSP
    other: str  # BPS asks for the population registry: MSP is no party

    def token(self, subject: str, role: Role, member: MemberId | None = None, **kw: Any) -> str:
        return self.issuer.issue(
            subject=subject,
            role=role,
            member=member,
            now=self.clock(),
            ttl=timedelta(hours=1),
            **kw,
        )

    async def state(self, agreement_id: str) -> str:
        doc = await self.gov.get_agreement(REGISTRY, agreement_id)
        return str(doc["state"])


REGISTRY = Principal(
    subject="root@registry", role=Role.REGISTRY_ADMIN, member=None, server=None, issuer="test"
)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    shutil.copyfile(TEMPLATE, tmp_path / "topology.toml")
    doc = tomllib.loads((tmp_path / "topology.toml").read_text())
    clock = Clock()
    init_pki(
        tmp_path / "pki",
        instance="UY",
        members=[MemberId.parse(m["id"]) for m in doc["members"]],
        servers=[SecurityServerId.parse(s["id"]) for s in doc["servers"]],
        registry_addresses=["127.0.0.1:1"],
        now=clock(),
    )
    store = await RegistryStore.open(database_url(str(tmp_path / "registry.db"), base=tmp_path))

    async def published() -> None:
        return None

    gov = Governance(store, instance="UY", policy=Policy(), clock=clock, on_change=published)
    await gov.seed(load_topology(tmp_path / "topology.toml"), "topology.toml")
    await gov.add_member(REGISTRY, BPS, "Banco de Previsión Social")
    await gov.add_subsystem(REGISTRY, SubsystemId.parse("UY/GOV/BPS/benefits"))
    basis = LegalBasis(kind=LegalBasisKind.LAW, reference="Ley 18.331")
    pending = await gov.request_agreement(
        member_admin("diego@dnic", DNIC),
        AgreementRequest(
            client=SubsystemId.parse("UY/GOV/DNIC/identity"),
            service=VACCINATION,
            purposes=("identity-check",),
            legal_basis=basis,
            valid_until=clock() + timedelta(days=10),
        ),
    )
    other = await gov.request_agreement(
        member_admin("beatriz@bps", BPS),
        AgreementRequest(
            client=SubsystemId.parse("UY/GOV/BPS/benefits"),
            service=POPULATION,
            purposes=("benefits",),
            legal_basis=basis,
        ),
    )
    issuer = TokenIssuer(
        ec.generate_private_key(ec.SECP256R1()), issuer="registry-UY", audience="gateway-admin"
    )
    verifier = TokenVerifier(issuer=issuer)
    api = AdminApi(gov, verifier, issuer, max_body_bytes=65536, clock=clock)
    # a port bound and never listening, for the fixture's life: connections are refused
    nobody = reserve_port()
    app = api.app()
    app.add_subapp(
        "/console",
        Console(
            gov,
            verifier,
            issuer,
            clock=clock,
            session_seconds=SESSION_SECONDS,
            # nothing listens there: the auditor pages say so (a real one: the browser test)
            auditor_apis={"UY/GOV/MSP/ss1": f"http://127.0.0.1:{nobody.getsockname()[1]}"},
        ).app(),
    )
    client: TestClient[Any, Any] = TestClient(TestServer(app))
    await client.start_server()
    try:
        yield World(client, gov, issuer, clock, pending["id"], other["id"])
    finally:
        nobody.close()
        await client.close()
        await store.close()


def member_admin(subject: str, member: MemberId) -> Principal:
    return Principal(
        subject=subject, role=Role.MEMBER_ADMIN, member=member, server=None, issuer="t"
    )


# ---- a browser, by hand: cookies as the server set them ---------------------------------


@dataclass
class Browser:
    world: World
    language: str = "en"
    cookies: dict[str, str] = field(default_factory=dict)
    last_set: dict[str, SimpleCookie] = field(default_factory=dict)

    def _headers(self) -> dict[str, str]:
        headers = {"Accept-Language": self.language}
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        return headers

    def _keep(self, response: Any) -> None:
        jar = keep_cookies(response, self.cookies)
        self.last_set.update(dict.fromkeys(jar, jar))

    async def get(self, path: str, status: int = 200, headers: dict[str, str] | None = None) -> str:
        response = await self.world.client.get(
            path, headers={**self._headers(), **(headers or {})}, allow_redirects=False
        )
        self._keep(response)
        body = await response.text()
        assert response.status == status, (path, response.status, body[:2000])
        for name, value in SECURITY_HEADERS.items():
            assert response.headers.get(name) == value, (path, name)
        return body

    async def post(self, path: str, form: dict[str, str], status: int = 303) -> Any:
        response = await self.world.client.post(
            path, data=form, headers=self._headers(), allow_redirects=False
        )
        self._keep(response)
        body = await response.text()
        assert response.status == status, (path, response.status, body[:2000])
        return response

    async def sign_in(self, token: str, status: int = 303) -> Any:
        page = await self.get("/console/sign-in")
        nonce = re.search(r'name="nonce" value="([^"]+)"', page)
        assert nonce is not None
        return await self.post(
            "/console/sign-in", {"nonce": nonce.group(1), "token": token}, status
        )

    async def csrf(self, path: str = "/console/") -> str:
        found = re.search(r'name="csrf" value="([0-9a-f]{64})"', await self.get(path))
        assert found is not None
        return found.group(1)


async def signed_in(
    world: World, subject: str, role: Role, member: MemberId | None = None
) -> Browser:
    browser = Browser(world)
    await browser.sign_in(world.token(subject, role, member))
    return browser


def visible_text(page: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", " ", page))


# ---- sign-in --------------------------------------------------------------------------


async def test_sign_in_gives_a_short_hardened_session_cookie(world: World) -> None:
    browser = Browser(world)
    answer = await browser.world.client.get("/console/", allow_redirects=False)
    assert (answer.status, answer.headers["Location"]) == (303, "/console/sign-in")
    signed = await browser.sign_in(world.token("carla@msp", Role.MEMBER_ADMIN, MSP))
    assert signed.headers["Location"] == "/console/"
    cookie = browser.last_set[SESSION_COOKIE][SESSION_COOKIE]
    assert cookie["httponly"] and cookie["secure"]
    # a `__Host-` cookie (Secure, on "/", no Domain): no sibling subdomain can plant one
    assert cookie["samesite"] == "Strict" and cookie["path"] == "/" and not cookie["domain"]
    assert SESSION_COOKIE.startswith("__Host-")
    assert 0 < int(cookie["max-age"]) <= SESSION_SECONDS
    home = await browser.get("/console/")
    assert "carla@msp" in home and "administrator of UY/GOV/MSP" in visible_text(home)
    # scripts and styles from this origin's files only: nothing inline runs
    policy = SECURITY_HEADERS["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "script-src 'self';" in policy
    assert "unsafe" not in policy and "style-src 'self';" in policy


async def test_sign_in_refusals(world: World) -> None:
    browser = Browser(world)
    await browser.sign_in("not-a-token", status=400)
    assert SESSION_COOKIE not in browser.cookies
    server_token = world.token(
        "ss", Role.SECURITY_SERVER, MSP, server=SecurityServerId.parse("UY/GOV/MSP/ss1")
    )
    refused = await browser.sign_in(server_token, status=400)
    assert "Security server tokens do not open the console" in await refused.text()
    assert SESSION_COOKIE not in browser.cookies
    # a sign-in posted from elsewhere carries no nonce of this browser's form
    stranger = Browser(world)
    await stranger.post(
        "/console/sign-in", {"token": world.token("x", Role.REGISTRY_ADMIN)}, status=400
    )
    assert SESSION_COOKIE not in stranger.cookies and SIGNIN_COOKIE in stranger.cookies


async def test_an_expired_session_returns_to_sign_in(world: World) -> None:
    browser = await signed_in(world, "root@registry", Role.REGISTRY_ADMIN)
    await browser.get("/console/")
    world.clock.now += timedelta(seconds=SESSION_SECONDS + 60)  # past the verifier's leeway
    answer = await world.client.get(
        "/console/agreements", headers=browser._headers(), allow_redirects=False
    )
    assert (answer.status, answer.headers["Location"]) == (303, "/console/sign-in?expired=1")
    browser._keep(answer)
    assert SESSION_COOKIE not in browser.cookies
    assert "Your session ended" in await browser.get("/console/sign-in?expired=1")


async def test_the_session_ends_with_the_token_signed_in_with(world: World) -> None:
    short = world.issuer.issue(
        subject="carla@msp",
        role=Role.MEMBER_ADMIN,
        member=MSP,
        now=world.clock(),
        ttl=timedelta(seconds=120),
    )
    browser = Browser(world)
    await browser.sign_in(short)
    assert int(browser.last_set[SESSION_COOKIE][SESSION_COOKIE]["max-age"]) <= 120


async def test_sign_out(world: World) -> None:
    browser = await signed_in(world, "root@registry", Role.REGISTRY_ADMIN)
    answer = await browser.post("/console/sign-out", {"csrf": await browser.csrf()})
    assert answer.headers["Location"] == "/console/sign-in?signed-out=1"
    assert SESSION_COOKIE not in browser.cookies


# ---- the workflow through the console ---------------------------------------------------


async def test_approval_from_the_home_page_by_both_sides_then_revocation(world: World) -> None:
    msp = await signed_in(world, "carla@msp", Role.MEMBER_ADMIN, MSP)
    home = await msp.get("/console/")
    awaiting = home.split('id="awaiting"')[1].split("</section>")[0]
    assert world.pending in awaiting and world.other not in awaiting
    await msp.post(
        f"/console/agreements/{world.pending}/approve", {"csrf": await msp.csrf(), "reason": ""}
    )
    assert await world.state(world.pending) == AgreementState.APPROVED_BY_PROVIDER.value
    # now it waits for the registry, not for MSP
    assert (
        world.pending
        not in (await msp.get("/console/")).split('id="awaiting"')[1].split("</section>")[0]
    )
    registry = await signed_in(world, "root@registry", Role.REGISTRY_ADMIN)
    home = await registry.get("/console/")
    assert world.pending in home.split('id="awaiting"')[1].split("</section>")[0]
    done = await registry.post(
        f"/console/agreements/{world.pending}/approve", {"csrf": await registry.csrf()}
    )
    assert done.headers["Location"] == f"/console/agreements/{world.pending}?done=approve"
    assert await world.state(world.pending) == AgreementState.ACTIVE.value
    # revoking needs a reason, as in the API
    csrf = await registry.csrf()
    refused = await registry.post(
        f"/console/agreements/{world.pending}/revoke", {"csrf": csrf, "reason": " "}, status=400
    )
    assert "revoke needs a reason" in await refused.text()
    await registry.post(
        f"/console/agreements/{world.pending}/revoke",
        {"csrf": csrf, "reason": "the law changed"},
    )
    assert await world.state(world.pending) == AgreementState.REVOKED.value
    # the same admin log entries as the API writes, and the timeline shows them
    history = await world.gov.agreement_history(REGISTRY, world.pending)
    assert [(e["action"], e["actor"], e["role"]) for e in history] == [
        ("request", "diego@dnic", "member-admin:UY/GOV/DNIC"),
        ("approve", "carla@msp", "member-admin:UY/GOV/MSP"),
        ("approve", "root@registry", "registry-admin"),
        ("revoke", "root@registry", "registry-admin"),
    ]
    page = " ".join(
        visible_text(await registry.get(f"/console/agreements/{world.pending}")).split()
    )
    assert "Reason: the law changed" in page
    assert "(approved by the provider → active)" in page and "(active → revoked)" in page
    assert (await world.gov.verify_admin_log(REGISTRY))["verified"] is True


async def test_the_home_page_charts_agreements_by_state_in_scope(world: World) -> None:
    """An SVG bar per state (no script, no inline style), and the same figures in a table."""
    registry = await signed_in(world, "root@registry", Role.REGISTRY_ADMIN)
    page = await registry.get("/console/")
    svg = page.split("<svg", 1)[1].split("</svg>", 1)[0]
    assert 'role="img"' in svg and "<title>Agreements by state</title>" in svg
    assert "style=" not in svg and "<script" not in svg
    figures = dict(re.findall(r"<tr><td>([a-z ]+)</td><td>(\d+)</td></tr>", page))
    assert (figures["requested"], figures["active"], figures["revoked"]) == ("2", "1", "0")
    msp = await signed_in(world, "carla@msp", Role.MEMBER_ADMIN, MSP)
    figures = dict(
        re.findall(r"<tr><td>([a-z ]+)</td><td>(\d+)</td></tr>", await msp.get("/console/"))
    )
    assert (figures["requested"], figures["active"]) == ("1", "1")  # BPS's request is not MSP's


async def test_a_registry_admin_approves_a_pending_server_from_the_home_page(
    world: World, tmp_path: Path
) -> None:
    certificate = issue(
        common_name="UY/GOV/BPS/ss1",
        issuer=load_issued(tmp_path / "pki", "ca"),
        now=world.clock(),
        days=30,
        kind="auth",
    ).certificate
    await world.gov.submit_server(
        member_admin("beatriz@bps", BPS),
        server=SecurityServerId.parse("UY/GOV/BPS/ss1"),
        address="127.0.0.1:7190",
        auth_certificate_pem=certificate.public_bytes(serialization.Encoding.PEM).decode(),
        subsystems_hosted=(SubsystemId.parse("UY/GOV/BPS/benefits"),),
    )
    # its member's administrator sees it waiting, and cannot approve it
    bps = await signed_in(world, "beatriz@bps", Role.MEMBER_ADMIN, BPS)
    home = await bps.get("/console/")
    assert "UY/GOV/BPS/ss1" in home and "/console/servers/approve" not in home
    form = {"csrf": await bps.csrf(), "server": "UY/GOV/BPS/ss1"}
    await bps.post("/console/servers/approve", form, status=403)
    assert "UY/GOV/BPS/ss1" not in await (await signed_in(world, "c", Role.MEMBER_ADMIN, MSP)).get(
        "/console/"
    )
    registry = await signed_in(world, "root@registry", Role.REGISTRY_ADMIN)
    assert 'value="UY/GOV/BPS/ss1"' in await registry.get("/console/")
    done = await registry.post(
        "/console/servers/approve", {"csrf": await registry.csrf(), "server": "UY/GOV/BPS/ss1"}
    )
    assert done.headers["Location"] == "/console/?approved=UY%2FGOV%2FBPS%2Fss1"
    assert "Server UY/GOV/BPS/ss1 approved." in await registry.get(done.headers["Location"])
    entries = await world.gov.admin_log(REGISTRY)
    assert (entries[-1]["action"], entries[-1]["actor"]) == ("approve_server", "root@registry")
    again = await registry.post(
        "/console/servers/approve", form | {"csrf": await registry.csrf()}, 409
    )
    assert "not pending" in html.unescape(await again.text())


async def test_a_member_admin_cannot_see_or_act_on_another_members_items(world: World) -> None:
    msp = await signed_in(world, "carla@msp", Role.MEMBER_ADMIN, MSP)
    listing = await msp.get("/console/agreements")
    assert world.pending in listing and world.other not in listing
    assert world.other not in await msp.get("/console/admin-log")
    await msp.get(f"/console/agreements/{world.other}", status=404)
    csrf = await msp.csrf()
    for action in ("approve", "reject", "revoke"):
        await msp.post(
            f"/console/agreements/{world.other}/{action}",
            {"csrf": csrf, "reason": "not mine"},
            status=404,
        )
    assert await world.state(world.other) == AgreementState.REQUESTED.value
    # a consumer cannot approve for the provider either
    dnic = await signed_in(world, "diego@dnic", Role.MEMBER_ADMIN, DNIC)
    page = await dnic.get(f"/console/agreements/{world.pending}")
    assert "/approve" not in page.split('id="actions"')[1]
    await dnic.post(
        f"/console/agreements/{world.pending}/approve", {"csrf": await dnic.csrf()}, status=403
    )
    assert await world.state(world.pending) == AgreementState.REQUESTED.value


async def test_an_auditor_reads_but_cannot_act(world: World) -> None:
    auditor = await signed_in(world, "ana@auditoria", Role.AUDITOR)
    page = await auditor.get(f"/console/agreements/{world.pending}")
    assert "You cannot change this agreement" in page
    await auditor.post(
        f"/console/agreements/{world.pending}/approve", {"csrf": await auditor.csrf()}, status=403
    )
    log = visible_text(await auditor.get("/console/admin-log"))
    assert "The admin log's chain verifies" in log


async def test_posts_without_this_sessions_csrf_token_are_refused(world: World) -> None:
    registry = await signed_in(world, "root@registry", Role.REGISTRY_ADMIN)
    other = await signed_in(world, "carla@msp", Role.MEMBER_ADMIN, MSP)
    path = f"/console/agreements/{world.other}/reject"
    forms = ({"reason": "x"}, {"csrf": "0" * 64, "reason": "x"}, {"csrf": await other.csrf()})
    with capture_logs() as logged:
        for form in forms:
            refused = await registry.post(path, {"reason": "x", **form}, status=403)
            assert "valid mark of this session" in await refused.text()
    # what an operator alerts on: each refusal in the registry's log
    assert [x["event"] for x in logged].count("console_csrf_refused") == len(forms)
    await registry.post("/console/sign-out", {}, status=403)
    assert SESSION_COOKIE in registry.cookies
    assert await world.state(world.other) == AgreementState.REQUESTED.value


# ---- the catalogue and requests from it --------------------------------------------------


async def test_a_member_admin_requests_an_agreement_from_a_services_page(world: World) -> None:
    bps = await signed_in(world, "beatriz@bps", Role.MEMBER_ADMIN, BPS)
    catalogue = await bps.get("/console/catalogue?q=vaccination")
    assert f'href="/console/services/{VACCINATION}"' in catalogue
    assert "UY/GOV/DNIC/identity/population/v1" not in catalogue  # searched out
    page = await bps.get(f"/console/services/{VACCINATION}")
    assert '<option value="UY/GOV/BPS/benefits">' in page
    # a service's streaming methods are named with their kind
    population = await bps.get(f"/console/services/{POPULATION}")
    assert "ExportPeople</code> (server streaming)" in population
    assert "Chat</code> (bidirectional streaming)" in population
    assert "GetPerson</code></li>" in population
    form = {
        "csrf": await bps.csrf(f"/console/services/{VACCINATION}"),
        "service": str(VACCINATION),
        "client": "UY/GOV/BPS/benefits",
        "purposes": "benefits, fraud-check",
        "legal_basis_kind": "law",
        "legal_basis_reference": "Ley 19.355 art. 7",
        "valid_until": "2099-12-31",
        "reason": "pensions paid to vaccinated workers",
    }
    done = await bps.post("/console/agreements", form)
    agreement = done.headers["Location"].split("/")[-1].split("?")[0]
    assert done.headers["Location"].endswith("?done=request")
    doc = await world.gov.get_agreement(REGISTRY, agreement)
    assert (doc["client"], doc["state"], doc["purposes"]) == (
        "UY/GOV/BPS/benefits",
        "requested",
        ["benefits", "fraud-check"],
    )
    assert doc["valid_until"].startswith("2100-01-01")  # to the end of the day asked for
    history = await world.gov.agreement_history(REGISTRY, agreement)
    assert [(e["action"], e["actor"]) for e in history] == [("request", "beatriz@bps")]
    # refused as the API refuses: another member's subsystem, a malformed purpose, no basis
    for change, status, words in (
        ({"client": "UY/GOV/MSP/clinics"}, 403, "request agreements for UY/GOV/MSP/clinics"),
        ({"purposes": "no spaces/allowed"}, 400, "is malformed"),
        ({"legal_basis_reference": " "}, 400, "name the legal basis"),
        ({"legal_basis_kind": "whim"}, 400, "kind of legal basis"),
        ({"valid_until": "31/12/2099"}, 400, "must be a date"),
        # the API's rules for text and dates hold here too (found by a red-team review:
        # a NUL was stored, and the last day of year 9999 was an internal error)
        ({"legal_basis_reference": "ley\x00 1"}, 400, "NUL characters are not allowed"),
        ({"valid_until": "9999-12-31"}, 400, "must be a date"),
    ):
        refused = await bps.post("/console/agreements", {**form, **change}, status=status)
        assert words in html.unescape(await refused.text()), change
    # only administrators of a member with subsystems see the form
    registry = await signed_in(world, "root@registry", Role.REGISTRY_ADMIN)
    assert 'action="/console/agreements"' not in await registry.get(
        f"/console/services/{VACCINATION}"
    )
    await registry.get("/console/services/UY/GOV/MSP/clinics/nothing/v1", status=404)


# ---- auditor pages ----------------------------------------------------------------------


async def test_the_auditor_pages_are_for_auditors_and_say_which_server_did_not_answer(
    world: World,
) -> None:
    registry = await signed_in(world, "root@registry", Role.REGISTRY_ADMIN)
    for path in ("/console/audit", "/console/audit/trace/abc", "/console/audit/subject?subject=1"):
        refused = await registry.get(path, status=403)
        assert "the auditor pages are for auditors" in refused
    assert "/console/audit" not in await registry.get("/console/")  # no link either
    auditor = await signed_in(world, "ana@auditoria", Role.AUDITOR)
    assert 'href="/console/audit"' in await auditor.get("/console/")
    page = visible_text(await auditor.get("/console/audit?server=UY/GOV/MSP/ss1&client=x"))
    assert "Some servers did not answer:" in page and "UY/GOV/MSP/ss1: ClientConnectorError" in page
    await auditor.get("/console/audit?server=UY/GOV/XX/ss9", status=400)
    page = visible_text(await auditor.get("/console/audit/trace/abc"))
    assert "No server logged this message." in page
    page = visible_text(await auditor.get("/console/audit/subject?subject=1.234.567-8"))
    assert "0 accesses" in page
    # the evidence download: from a configured server only, and it says when it cannot
    page = await auditor.get("/console/audit/evidence?server=UY/GOV/MSP/ss1&message_id=m", 409)
    assert "UY/GOV/MSP/ss1 cannot be reached" in page
    await auditor.get("/console/audit/evidence?server=UY/GOV/XX/ss9&message_id=m", status=400)
    await registry.get("/console/audit/evidence?server=UY/GOV/MSP/ss1&message_id=m", 403)


# ---- languages ------------------------------------------------------------------------


async def pages(world: World, browser: Browser) -> dict[str, str]:
    return {
        "home": await browser.get("/console/"),
        "agreements": await browser.get("/console/agreements?state=requested&q=UY"),
        "agreement": await browser.get(f"/console/agreements/{world.pending}"),
        "active": await browser.get("/console/agreements/AGR-2026-0001"),
        "admin-log": await browser.get("/console/admin-log"),
        "catalogue": await browser.get("/console/catalogue"),
        "service": await browser.get(f"/console/services/{VACCINATION}"),
        "not-found": await browser.get("/console/agreements/AGR-0000-0000", status=404),
        "bad-filter": await browser.get("/console/agreements?state=nonsense", status=400),
    }


async def rendered_in(world: World, language: str) -> dict[str, str]:
    """Every page, as a registry administrator, a member administrator and signed out."""
    browser = await signed_in(world, "root@registry", Role.REGISTRY_ADMIN)
    browser.language = language
    rendered = await pages(world, browser)
    member = await signed_in(world, "beatriz@bps", Role.MEMBER_ADMIN, BPS)
    member.language = language
    rendered["service-request-form"] = await member.get(f"/console/services/{VACCINATION}")
    assert 'action="/console/agreements"' in rendered["service-request-form"]
    auditor = await signed_in(world, "ana@auditoria", Role.AUDITOR)
    auditor.language = language
    rendered["audit"] = await auditor.get("/console/audit?client=x")
    rendered["audit-trace"] = await auditor.get("/console/audit/trace/abc")
    rendered["audit-subject"] = await auditor.get("/console/audit/subject?subject=1")
    browser.cookies.pop(SESSION_COOKIE)
    rendered["sign-in"] = await browser.get("/console/sign-in?expired=1")
    return rendered


async def test_every_page_in_each_language_has_no_untranslated_string(world: World) -> None:
    """Each page in each language shows none of the strings another language says
    differently. A string found on a page in all three languages is the page's data (a
    member's name that is also a Spanish word, say); words written into a template instead
    of the catalogue are caught by `test_templates_hold_no_words_of_their_own`."""
    rendered = {language: await rendered_in(world, language) for language in LANGUAGES}

    def shows(page: str, value: str) -> bool:
        return bool(re.search(rf"(?<!\w){re.escape(value)}(?!\w)", visible_text(page)))

    for language in LANGUAGES:
        # the strings of the other languages that this one says differently
        foreign = {
            value
            for other in LANGUAGES
            if other != language
            for key, value in TEXT[other].items()
            if value != TEXT[language][key]
            and value not in TEXT[language].values()
            and "{" not in value
            and len(value) > 3
            and re.search(r"[a-z]{3}", value)
        }
        for name, page in rendered[language].items():
            assert f'<html lang="{language}">' in page, name
            leaked = sorted(
                v
                for v in foreign
                if shows(page, v) and not all(shows(rendered[x][name], v) for x in LANGUAGES)
            )
            assert not leaked, (language, name, leaked)


async def test_the_language_follows_the_browser_then_the_switch(world: World) -> None:
    browser = await signed_in(world, "root@registry", Role.REGISTRY_ADMIN)
    browser.language = "pt-BR,pt;q=0.9,en;q=0.8"
    page = await browser.get("/console/agreements/AGR-2026-0001")
    assert '<html lang="pt">' in page and "Acordo AGR-2026-0001" in page
    assert "jan." in page  # valid from 1 January 2026, in Portuguese
    page = await browser.get("/console/agreements/AGR-2026-0001?lang=es")
    assert '<html lang="es">' in page and "ene" in page
    # the switch is kept
    assert '<html lang="es">' in await browser.get("/console/")
    browser.cookies.pop("gateway_console_lang")
    browser.language = "en-US"
    assert "Jan 1, 2026" in await browser.get("/console/agreements/AGR-2026-0001")


async def test_a_sign_out_holds_on_every_registry_replica(world: World) -> None:
    """Two registry processes over one database (and one token key) accept each other's
    sessions; a sign-out on one is refused by the other too."""
    other = web.Application()
    other.add_subapp(
        "/console",
        Console(
            world.gov, TokenVerifier(issuer=world.issuer), world.issuer, clock=world.clock
        ).app(),
    )
    replica: TestClient[Any, Any] = TestClient(TestServer(other))
    await replica.start_server()
    try:
        browser = await signed_in(world, "root@registry", Role.REGISTRY_ADMIN)
        headers = browser._headers()
        assert (
            await replica.get("/console/", headers=headers, allow_redirects=False)
        ).status == 200
        await browser.post("/console/sign-out", {"csrf": await browser.csrf()})
        answer = await replica.get("/console/", headers=headers, allow_redirects=False)
        assert (answer.status, answer.headers["Location"]) == (303, "/console/sign-in?expired=1")
    finally:
        await replica.close()


async def test_static_unknown_and_refused_paths_carry_the_security_headers(world: World) -> None:
    browser = await signed_in(world, "root@registry", Role.REGISTRY_ADMIN)
    for method, path, status in (
        ("GET", "/console/static/console.css", 200),
        ("GET", "/console/no-such-page", 404),
        ("GET", "/console/sign-out", 405),
        # any POST needs this session's mark first, whatever its path
        ("POST", "/console/oidc/start", 403),
        ("POST", "/console/static/console.css", 403),
    ):
        answer = await world.client.request(
            method, path, headers=browser._headers(), allow_redirects=False
        )
        assert answer.status == status, (path, await answer.text())
        for name, value in SECURITY_HEADERS.items():
            assert answer.headers.get(name) == value, (path, name)
    # odd characters in a form's marks are refused, not a crash
    for form in ({"csrf": "é" * 64}, {"csrf": "\x00"}):
        await browser.post("/console/sign-out", form, status=403)
    stranger = Browser(world)
    await stranger.post("/console/sign-in", {"nonce": "ñ", "token": "x"}, status=400)
    await stranger.post("/console/oidc/start", {}, status=403)  # no session: no mark


async def test_the_session_is_no_token_and_ends_at_sign_out(world: World) -> None:
    """The session cookie is a value only the console reads: no API takes it as a bearer
    token. Signed out, it opens nothing, even sent again by hand."""
    browser = await signed_in(world, "root@registry", Role.REGISTRY_ADMIN)
    session = browser.cookies[SESSION_COOKIE]
    answer = await world.client.get(
        "/v1/agreements", headers={"Authorization": f"Bearer {session}"}
    )
    assert answer.status == 401
    await browser.post("/console/sign-out", {"csrf": await browser.csrf()})
    browser.cookies[SESSION_COOKIE] = session
    answer = await world.client.get("/console/", headers=browser._headers(), allow_redirects=False)
    assert (answer.status, answer.headers["Location"]) == (303, "/console/sign-in?expired=1")
    # a forged one: another principal, the same seal
    body, _, seal = session.partition(".")
    forged = body[:-4] + ("AAAA" if not body.endswith("AAAA") else "BBBB")
    browser.cookies[SESSION_COOKIE] = f"{forged}.{seal}"
    answer = await world.client.get("/console/", headers=browser._headers(), allow_redirects=False)
    assert answer.status == 303


def test_templates_hold_no_words_of_their_own() -> None:
    """Every word a page shows comes from `registry.console.text` (or from the data): the
    templates, once their tags, expressions and markup are taken out, hold no letters."""
    folder = Path(__file__).resolve().parents[2] / "registry" / "console" / "templates"
    for template in sorted(folder.glob("*.html")):
        source = template.read_text()
        source = re.sub(r"\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\}", " ", source, flags=re.S)
        source = re.sub(r"<!DOCTYPE html>|<[^>]*>", " ", source)
        assert not re.search(r"[^\W\d_]{2,}", source), (template.name, source.split())
        # no inline script or style: the policy would block it
        for element in re.findall(r"<(?:script|style)\b[^>]*>", template.read_text()):
            assert 'src="/console/static/' in element, (template.name, element)
        assert not re.search(r"<[^>]*\s(?:style|on[a-z]+)\s*=", template.read_text()), template.name


def test_every_language_translates_every_string() -> None:
    """The same keys in each language, each with the same placeholders, and no string left
    as another language's: only these say the same in every language."""
    the_same_everywhere = {"state.none", "action.other", "agreement.transition", "audit.offset"}
    for language in LANGUAGES:
        assert TEXT[language].keys() == TEXT["en"].keys(), language
        for key, value in TEXT[language].items():
            assert re.findall(r"\{\w+\}", value) == re.findall(r"\{\w+\}", TEXT["en"][key]), key
            if language != "en" and key not in the_same_everywhere:
                assert value != TEXT["en"][key], (language, key, value)


@pytest.mark.parametrize(
    "cookie", [b"__Host-gateway_console=abc.\xff\xfe", b"__Host-gateway_console=\xff"]
)
async def test_a_cookie_that_is_not_utf8_is_no_session_not_a_failure(
    world: World, cookie: bytes
) -> None:
    """A cookie's bytes that are not UTF-8 (planted, or damaged) are a missing session: the
    browser is sent to sign in, instead of a 500 for anyone (found by a red-team review).
    Sent on a raw connection: an HTTP client would encode the header as UTF-8."""
    url = world.client.make_url("/console/")
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(b"GET /console/ HTTP/1.1\r\nHost: x\r\nCookie: " + cookie + b"\r\n\r\n")
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()
    assert status_line.split()[1] in (b"302", b"303"), status_line


@pytest.mark.parametrize("site", ["same-site", "cross-site"])
async def test_audit_pages_are_not_opened_on_behalf_of_another_sites_page(
    world: World, site: str
) -> None:
    """A page of a sibling subdomain (same site: SameSite=Strict sends the cookie) cannot
    make an auditor's browser query every server in the auditor's name: the browser says
    where the request came from (Sec-Fetch-Site), and only the console's own pages, or the
    address bar, open an audit page."""
    auditor = await signed_in(world, "audit@registry", Role.AUDITOR)
    for path in ("/console/audit?client=x", "/console/audit/subject?subject=1"):
        refused = await auditor.get(path, status=403, headers={"Sec-Fetch-Site": site})
        assert "another site" in refused
    await auditor.get("/console/audit", headers={"Sec-Fetch-Site": "same-origin"})
    await auditor.get("/console/audit", headers={"Sec-Fetch-Site": "none"})
