"""The console's OpenID Connect sign-in (authorization code with PKCE) against a provider on
loopback: real HTTP, real RSA-signed ID tokens, a provider that checks the PKCE verifier
against the challenge as a real one does. The happy path, then each way a sign-in is
refused: another sign-in's state, no or a forged sealed cookie, the provider's own
refusal, a wrong nonce, a token the verifier refuses, a security-server role.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import aiohttp
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import RSAAlgorithm

from gateway.settings import database_url
from gateway.workflow import Policy
from gateway_ops.auth import OidcSettings, TokenIssuer, TokenVerifier
from registry.api import AdminApi
from registry.console import OIDC_COOKIE, SESSION_COOKIE, Console
from registry.governance import Governance
from registry.store import RegistryStore
from tests.integration.conftest import keep_cookies

ISSUER = "https://login.example.gub.uy/"
CLIENT = "gateway-console"


@dataclass
class Provider:
    """An OpenID Connect provider that approves whoever comes, as `claims` say."""

    key: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    claims: dict[str, Any] = field(
        default_factory=lambda: {
            "sub": "maria@msp.gub.uy",
            "gateway_role": "member-admin",
            "gateway_member": "UY/GOV/MSP",
        }
    )
    codes: dict[str, dict[str, str]] = field(default_factory=dict)
    wrong_nonce: bool = False
    refusals: list[str] = field(default_factory=list)
    url: str = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/jwks", self.jwks)
        app.router.add_get("/authorize", self.authorize)
        app.router.add_post("/token", self.token)
        return app

    async def jwks(self, _: web.Request) -> web.Response:
        jwk = {**RSAAlgorithm.to_jwk(self.key.public_key(), as_dict=True), "kid": "k1"}
        return web.json_response({"keys": [{**jwk, "use": "sig", "alg": "RS256"}]})

    async def authorize(self, request: web.Request) -> web.Response:
        q = request.query
        assert q["response_type"] == "code" and q["client_id"] == CLIENT
        assert q["code_challenge_method"] == "S256" and q["scope"] == "openid"
        code = secrets.token_urlsafe(16)
        self.codes[code] = {
            "challenge": q["code_challenge"],
            "nonce": q["nonce"],
            "redirect_uri": q["redirect_uri"],
        }
        raise web.HTTPFound(f"{q['redirect_uri']}?{urlencode({'code': code, 'state': q['state']})}")

    async def token(self, request: web.Request) -> web.Response:
        form = await request.post()
        asked = self.codes.pop(str(form.get("code")), None)
        verifier = str(form.get("code_verifier", ""))
        challenge = (
            base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
            .decode()
            .rstrip("=")
        )
        if (
            asked is None
            or form.get("grant_type") != "authorization_code"
            or form.get("client_id") != CLIENT
            or form.get("redirect_uri") != asked["redirect_uri"]
            or challenge != asked["challenge"]
        ):
            self.refusals.append("invalid_grant")
            return web.json_response({"error": "invalid_grant"}, status=400)
        now = int(time.time())
        id_token = jwt.encode(
            {
                "iss": ISSUER,
                "aud": CLIENT,
                "iat": now,
                "exp": now + 300,
                "nonce": "not-yours" if self.wrong_nonce else asked["nonce"],
                **self.claims,
            },
            self.key,
            algorithm="RS256",
            headers={"kid": "k1"},
        )
        return web.json_response({"id_token": id_token, "token_type": "Bearer"})


@dataclass
class Setup:
    provider: Provider
    console: TestClient[Any, Any]
    http: aiohttp.ClientSession
    cookies: dict[str, str] = field(default_factory=dict)
    skew: timedelta = timedelta(0)  # added to the console's clock

    def keep(self, response: aiohttp.ClientResponse) -> SimpleCookie:
        return keep_cookies(response, self.cookies)

    async def get(self, url: str) -> aiohttp.ClientResponse:
        headers = {"Accept-Language": "en"}
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        response = await self.http.get(url, headers=headers, allow_redirects=False)
        await response.read()
        return response

    async def to_provider(self) -> str:
        """Start a sign-in; the provider's redirect back (the callback URL)."""
        started = await self.get(str(self.console.make_url("/console/oidc/start")))
        assert started.status == 303, await started.text()
        jar = self.keep(started)
        cookie = jar[OIDC_COOKIE]
        assert cookie["httponly"] and cookie["secure"] and cookie["samesite"] == "Lax"
        assert cookie["path"] == "/" and OIDC_COOKIE.startswith("__Host-")
        location = started.headers["Location"]
        assert location.startswith(self.provider.url + "/authorize?")
        back = await self.http.get(location, allow_redirects=False)
        assert back.status == 302
        return back.headers["Location"]

    async def callback(self, url: str, status: int = 303) -> aiohttp.ClientResponse:
        answer = await self.get(url)
        assert answer.status == status, await answer.text()
        self.keep(answer)
        return answer


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    provider = Provider()
    provider_runner = web.AppRunner(provider.app())
    await provider_runner.setup()
    site = web.TCPSite(provider_runner, "127.0.0.1", 0)
    await site.start()
    provider.url = f"http://127.0.0.1:{provider_runner.addresses[0][1]}"
    # the callback's address is known once the console listens (port 0): set just below
    oidc = OidcSettings(
        jwks_url=f"{provider.url}/jwks",
        issuer=ISSUER,
        audience=CLIENT,
        authorization_url=f"{provider.url}/authorize",
        token_url=f"{provider.url}/token",
        client_id=CLIENT,
        redirect_url="http://127.0.0.1:1/console/oidc/callback",
    )
    store = await RegistryStore.open(database_url(str(tmp_path / "registry.db"), base=tmp_path))

    skew: list[Setup] = []

    def clock() -> datetime:
        return datetime.now(UTC) + (skew[0].skew if skew else timedelta(0))

    async def published() -> None:
        return None

    gov = Governance(store, instance="UY", policy=Policy(), clock=clock, on_change=published)
    issuer = TokenIssuer(
        ec.generate_private_key(ec.SECP256R1()), issuer="registry-UY", audience="gateway-admin"
    )
    verifier = TokenVerifier(issuer=issuer, oidc=oidc)
    app = AdminApi(gov, verifier, issuer, max_body_bytes=65536, clock=clock).app()
    pages = Console(gov, verifier, issuer, clock=clock, oidc=oidc)
    app.add_subapp("/console", pages.app())
    console: TestClient[Any, Any] = TestClient(TestServer(app, port=0))
    await console.start_server()
    pages.oidc = dataclasses.replace(
        oidc, redirect_url=str(console.make_url("/console/oidc/callback"))
    )
    async with aiohttp.ClientSession() as http:
        skew.append(Setup(provider, console, http))
        try:
            yield skew[0]
        finally:
            await console.close()
            await provider_runner.cleanup()
            await store.close()


async def test_sign_in_through_the_provider_with_pkce(setup: Setup) -> None:
    page = await setup.get(str(setup.console.make_url("/console/sign-in")))
    assert 'href="/console/oidc/start"' in await page.text()
    back = await setup.to_provider()
    assert urlsplit(back).path == "/console/oidc/callback"
    signed = await setup.callback(back)
    assert signed.headers["Location"] == "/console/"
    assert SESSION_COOKIE in setup.cookies and OIDC_COOKIE not in setup.cookies
    home = await (await setup.get(str(setup.console.make_url("/console/")))).text()
    assert "maria@msp.gub.uy" in home and "administrator of UY/GOV/MSP" in home
    # the sealed cookie went with the sign-in: the same answer cannot be replayed
    setup.cookies.pop(SESSION_COOKIE)
    await setup.callback(back, status=400)
    assert SESSION_COOKIE not in setup.cookies


async def test_a_token_of_several_audiences_issued_to_the_console_signs_in(setup: Setup) -> None:
    setup.provider.claims = {**setup.provider.claims, "aud": [CLIENT, "app"], "azp": CLIENT}
    signed = await setup.callback(await setup.to_provider())
    assert signed.headers["Location"] == "/console/"
    assert SESSION_COOKIE in setup.cookies


async def test_another_sign_ins_answer_is_refused(setup: Setup) -> None:
    """An attacker's own callback URL (their code and state) pushed on a victim, whose
    browser holds a sign-in of its own: the state differs, nothing is exchanged."""
    attacker = await setup.to_provider()
    await setup.to_provider()  # the victim's sign-in, whose sealed cookie the browser holds
    answer = await setup.callback(attacker, status=400)
    assert "not for this sign-in (state)" in await answer.text()
    assert SESSION_COOKIE not in setup.cookies and not setup.provider.refusals


async def test_no_or_a_forged_sealed_cookie_is_refused(setup: Setup) -> None:
    back = await setup.to_provider()
    sealed = setup.cookies.pop(OIDC_COOKIE)
    answer = await setup.callback(back, status=400)
    assert "did not start here" in await answer.text()
    body, _, mac = sealed.partition(".")
    doc = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    forged = base64.urlsafe_b64encode(doc.replace(b'"verifier": "', b'"verifier": "x')).decode()
    setup.cookies[OIDC_COOKIE] = f"{forged.rstrip('=')}.{mac}"
    answer = await setup.callback(back, status=400)
    assert "did not start here" in await answer.text()
    assert SESSION_COOKIE not in setup.cookies


async def test_a_wrong_verifier_is_refused_by_the_provider(setup: Setup) -> None:
    """PKCE: a code is worth nothing without the verifier only this sign-in holds."""
    back = await setup.to_provider()
    code = parse_qs(urlsplit(back).query)["code"][0]
    stolen = await setup.http.post(
        f"{setup.provider.url}/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "client_id": CLIENT,
            "redirect_uri": f"{setup.console.make_url('/console/oidc/callback')}",
            "code_verifier": secrets.token_urlsafe(32),
        },
    )
    assert stolen.status == 400 and setup.provider.refusals == ["invalid_grant"]


@pytest.mark.parametrize(
    "case",
    [
        "provider-error",
        "wrong-nonce",
        "security-server",
        "expired",
        "issued-to-another-client",
        "several-audiences-no-azp",
    ],
)
async def test_refused_sign_ins(setup: Setup, case: str) -> None:
    back = await setup.to_provider()
    expected = {
        "provider-error": "the provider said access_denied",
        "wrong-nonce": "not for this sign-in (nonce)",
        "security-server": "security-server tokens do not open the console",
        "expired": "did not start here",
        "issued-to-another-client": "issued to another client (azp)",
        "several-audiences-no-azp": "issued to another client (azp)",
    }[case]
    if case == "provider-error":
        state = parse_qs(urlsplit(back).query)["state"][0]
        back = f"{back.split('?')[0]}?{urlencode({'error': 'access_denied', 'state': state})}"
    elif case == "wrong-nonce":
        setup.provider.wrong_nonce = True
    elif case == "security-server":
        setup.provider.claims = {
            "sub": "ss1",
            "gateway_role": "security-server",
            "gateway_member": "UY/GOV/MSP",
            "gateway_server": "UY/GOV/MSP/ss1",
        }
    elif case == "issued-to-another-client":  # our audience among others, for another app
        setup.provider.claims = {**setup.provider.claims, "aud": [CLIENT, "app"], "azp": "app"}
    elif case == "several-audiences-no-azp":
        setup.provider.claims = {**setup.provider.claims, "aud": [CLIENT, "app"]}
    else:  # back after the sealed cookie's ten minutes
        setup.skew += timedelta(seconds=601)
    answer = await setup.callback(back, status=400)
    assert expected in await answer.text(), case
    assert SESSION_COOKIE not in setup.cookies


def test_half_a_browser_sign_in_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="together"):
        OidcSettings(
            jwks_url="https://login.example/jwks",
            issuer=ISSUER,
            audience=CLIENT,
            authorization_url="https://login.example/authorize",
        )
    with pytest.raises(ValueError, match="https"):
        OidcSettings(
            jwks_url="https://login.example/jwks",
            issuer=ISSUER,
            audience=CLIENT,
            authorization_url="http://login.example/authorize",
            token_url="https://login.example/token",
            client_id=CLIENT,
            redirect_url="https://registry.example/console/oidc/callback",
        )
