"""gateway_ops.auth against a real JWKS endpoint: an aiohttp server on loopback, real RSA keys.

The server's key list and HTTP status can be changed between calls, and it counts its
requests, so the tests see when the verifier fetches, caches and refetches. The JWKS
refetch limit is measured with the `now` given to `verify`, so no test sleeps longer than a
background refresh takes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest
import structlog
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import RSAAlgorithm

from gateway.identifiers import MemberId, SecurityServerId
from gateway_ops.auth import (
    AuthError,
    OidcSettings,
    Principal,
    Role,
    TokenIssuer,
    TokenVerifier,
    auditor_api_audience,
)

NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
OIDC_ISSUER = "https://idp.gov.example/realms/gateway"
OIDC_AUDIENCE = "gateway-registry"


class JwksEndpoint:
    """A JWKS endpoint on 127.0.0.1 whose answer the test controls."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.status = 200
        self.delay = 0.0  # seconds before each answer (cut short when it stops)
        self.hits = 0
        self._stopping = asyncio.Event()
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/jwks", self._serve)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}/jwks"

    async def stop(self) -> None:
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _serve(self, request: web.Request) -> web.Response:
        self.hits += 1
        if self.delay:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.delay)
        return web.json_response({"keys": self.keys}, status=self.status)


def public_jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    return {
        **RSAAlgorithm.to_jwk(key.public_key(), as_dict=True),
        "kid": kid,
        "use": "sig",
        "alg": "RS256",
    }


def oidc_token(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
    kid: str,
    *,
    at: datetime = NOW,
    algorithm: str = "RS256",
    **claims: Any,
) -> str:
    """A token of the OIDC provider for a member-admin of UY/GOV/MSP, issued at `at`."""
    payload = {
        "iss": OIDC_ISSUER,
        "aud": OIDC_AUDIENCE,
        "sub": "maria@msp.gub.uy",
        "iat": int(at.timestamp()),
        "exp": int((at + timedelta(minutes=5)).timestamp()),
        "gw_role": "member-admin",
        "gw_member": "UY/GOV/MSP",
        **claims,
    }
    return jwt.encode(payload, key, algorithm=algorithm, headers={"kid": kid})


@pytest.fixture(scope="module")
def key_a() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def key_b() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
async def endpoint(key_a: rsa.RSAPrivateKey) -> AsyncIterator[JwksEndpoint]:
    server = JwksEndpoint()
    server.keys = [public_jwk(key_a, "key-a")]
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def verifier(endpoint: JwksEndpoint) -> AsyncIterator[TokenVerifier]:
    registry = TokenIssuer(
        ec.generate_private_key(ec.SECP256R1()),
        issuer="https://registry.gov.example",
        audience="gateway-registry-admin",
    )
    oidc = OidcSettings(
        jwks_url=endpoint.url,
        issuer=OIDC_ISSUER,
        audience=OIDC_AUDIENCE,
        role_claim="gw_role",
        member_claim="gw_member",
        server_claim="gw_server",
    )
    verifier = TokenVerifier(issuer=registry, oidc=oidc)
    yield verifier
    await verifier.close()


async def test_oidc_token_accepted(
    endpoint: JwksEndpoint, verifier: TokenVerifier, key_a: rsa.RSAPrivateKey
) -> None:
    """An RS256 token of the OIDC provider, signed with a key of its JWKS, gives its principal."""
    principal = await verifier.verify(oidc_token(key_a, "key-a"), now=NOW)
    assert principal == Principal(
        subject="maria@msp.gub.uy",
        role=Role.MEMBER_ADMIN,
        member=MemberId.parse("UY/GOV/MSP"),
        server=None,
        issuer=OIDC_ISSUER,
    )


async def test_security_server_token_of_provider_accepted(
    endpoint: JwksEndpoint, verifier: TokenVerifier, key_a: rsa.RSAPrivateKey
) -> None:
    """A security-server token of the provider is scoped to the server and its owner."""
    token = oidc_token(
        key_a, "key-a", gw_role="security-server", gw_member=None, gw_server="UY/GOV/MSP/ss1"
    )
    principal = await verifier.verify(token, now=NOW)
    assert (principal.role, principal.server, principal.member) == (
        Role.SECURITY_SERVER,
        SecurityServerId.parse("UY/GOV/MSP/ss1"),
        MemberId.parse("UY/GOV/MSP"),
    )


async def test_oidc_auditor_without_member_refused(
    endpoint: JwksEndpoint, verifier: TokenVerifier, key_a: rsa.RSAPrivateKey
) -> None:
    """An OIDC auditor token without a member claim is refused, not made instance-wide."""
    token = oidc_token(key_a, "key-a", gw_role="auditor", gw_member=None)
    with pytest.raises(AuthError, match="must name a member in 'gw_member'"):
        await verifier.verify(token, now=NOW)
    scoped = oidc_token(key_a, "key-a", gw_role="auditor", gw_member="UY/GOV/MSP")
    assert (await verifier.verify(scoped, now=NOW)).member == MemberId.parse("UY/GOV/MSP")


async def test_keys_are_cached(
    endpoint: JwksEndpoint, verifier: TokenVerifier, key_a: rsa.RSAPrivateKey
) -> None:
    """Tokens with a known key id are verified without fetching the JWKS again."""
    for offset in range(3):
        at = NOW + timedelta(minutes=offset)
        await verifier.verify(oidc_token(key_a, "key-a", at=at), now=at)
    assert endpoint.hits == 1


async def test_token_signed_with_another_key_refused(
    endpoint: JwksEndpoint, verifier: TokenVerifier, key_b: rsa.RSAPrivateKey
) -> None:
    """A token of the provider's issuer signed with an RSA key not in its JWKS is refused."""
    with pytest.raises(AuthError, match=r"^token signature does not verify$"):
        await verifier.verify(oidc_token(key_b, "key-a"), now=NOW)


async def test_algorithm_not_matching_key_refused(
    endpoint: JwksEndpoint, verifier: TokenVerifier
) -> None:
    """An ES256 token naming an RS256 key of the provider is refused."""
    token = oidc_token(ec.generate_private_key(ec.SECP256R1()), "key-a", algorithm="ES256")
    with pytest.raises(AuthError, match="does not match the algorithm 'RS256' of key 'key-a'"):
        await verifier.verify(token, now=NOW)


async def test_key_rotation_picked_up(
    endpoint: JwksEndpoint,
    verifier: TokenVerifier,
    key_a: rsa.RSAPrivateKey,
    key_b: rsa.RSAPrivateKey,
) -> None:
    """A new key id is fetched when a token names it, at most once every 10 seconds."""
    await verifier.verify(oidc_token(key_a, "key-a"), now=NOW)
    endpoint.keys = [public_jwk(key_b, "key-b")]

    soon = NOW + timedelta(seconds=5)
    with pytest.raises(AuthError, match="token key id 'key-b' is not among the keys"):
        await verifier.verify(oidc_token(key_b, "key-b", at=soon), now=soon)
    assert endpoint.hits == 1

    later = NOW + timedelta(seconds=11)
    principal = await verifier.verify(oidc_token(key_b, "key-b", at=later), now=later)
    assert principal.issuer == OIDC_ISSUER
    assert endpoint.hits == 2
    with pytest.raises(AuthError, match="token key id 'key-a' is not among the keys"):
        await verifier.verify(oidc_token(key_a, "key-a", at=later), now=later)


async def test_endpoint_down_refused(
    endpoint: JwksEndpoint, verifier: TokenVerifier, key_a: rsa.RSAPrivateKey
) -> None:
    """When the JWKS endpoint cannot be reached, the token is refused and the failure logged."""
    await endpoint.stop()
    with structlog.testing.capture_logs() as logs, pytest.raises(AuthError) as info:
        await verifier.verify(oidc_token(key_a, "key-a"), now=NOW)
    assert info.value.message == (
        f"cannot fetch the keys of issuer {OIDC_ISSUER!r}: the key endpoint cannot be reached"
    )
    assert [entry["event"] for entry in logs] == ["jwks_fetch_failed"]
    assert logs[0]["url"] == endpoint.url


async def test_endpoint_error_status_refused(
    endpoint: JwksEndpoint, verifier: TokenVerifier, key_a: rsa.RSAPrivateKey
) -> None:
    """When the JWKS endpoint answers an HTTP error, the refusal says which."""
    endpoint.status = 503
    with pytest.raises(AuthError, match=r"the key endpoint answered HTTP 503$"):
        await verifier.verify(oidc_token(key_a, "key-a"), now=NOW)


async def test_fetched_keys_kept_when_refresh_fails(
    endpoint: JwksEndpoint, verifier: TokenVerifier, key_a: rsa.RSAPrivateKey
) -> None:
    """When a periodic refresh fails, the keys fetched before stay in use."""
    await verifier.verify(oidc_token(key_a, "key-a"), now=NOW)
    await endpoint.stop()
    stale = NOW + timedelta(minutes=6)
    principal = await verifier.verify(oidc_token(key_a, "key-a", at=stale), now=stale)
    assert principal.role is Role.MEMBER_ADMIN


async def test_a_slow_endpoint_holds_up_no_token_of_a_known_key(
    endpoint: JwksEndpoint, verifier: TokenVerifier, key_a: rsa.RSAPrivateKey
) -> None:
    """The key set is due for a refresh and the endpoint answers in 30 s: a token of a key
    held is checked at once with the set held, the refresh going on beside it (every
    sign-in used to wait behind it, and any caller could start one with an unknown kid)."""
    await verifier.verify(oidc_token(key_a, "key-a"), now=NOW)
    endpoint.delay = 30
    later = NOW + timedelta(minutes=6)
    started = time.monotonic()
    principal = await verifier.verify(oidc_token(key_a, "key-a", at=later), now=later)
    assert principal.role is Role.MEMBER_ADMIN
    with pytest.raises(AuthError, match="'nope' is not among the keys"):
        await verifier.verify(oidc_token(key_a, "nope", at=later), now=later)
    assert time.monotonic() - started < 2
    await asyncio.sleep(0.2)
    assert endpoint.hits == 2  # the refresh under way, once


async def test_keys_are_not_trusted_for_ever_when_refreshing_them_fails(
    endpoint: JwksEndpoint, verifier: TokenVerifier, key_a: rsa.RSAPrivateKey
) -> None:
    """A key the provider removed, with its endpoint unreachable or failing since (or
    blocked by whoever sits on the way), is trusted an hour at most."""
    await verifier.verify(oidc_token(key_a, "key-a"), now=NOW)
    endpoint.status = 500
    within = NOW + timedelta(minutes=59)
    assert (await verifier.verify(oidc_token(key_a, "key-a", at=within), now=within)).subject
    await asyncio.sleep(0.1)  # the failed refresh beside it
    past = NOW + timedelta(minutes=61)
    with pytest.raises(AuthError, match=r"cannot fetch the keys .* answered HTTP 500"):
        await verifier.verify(oidc_token(key_a, "key-a", at=past), now=past)


async def test_a_token_forwarded_to_one_auditor_api_is_good_there_only(
    endpoint: JwksEndpoint,
) -> None:
    """The registry's console forwards an auditor's token to each server's auditor API with
    that server's audience: the server accepts it, another server and the registry itself
    do not (with the registry's own audience, a server receiving it could replay it at the
    admin API, the console and every other server; found by a red-team review)."""
    registry = TokenIssuer(
        ec.generate_private_key(ec.SECP256R1()), issuer="gateway-registry:UY", audience="gw:UY"
    )
    endpoint.keys = list(registry.jwks()["keys"])
    forwarded = registry.issue(
        subject="carla@auditoria",
        role=Role.AUDITOR,
        now=NOW,
        ttl=timedelta(minutes=1),
        audience=auditor_api_audience("UY/GOV/MSP/ss1"),
    )

    def server(name: str) -> TokenVerifier:
        trust = OidcSettings(
            jwks_url=endpoint.url,
            issuer=registry.issuer,
            audience=registry.audience,
            algorithms=("ES256",),
            instance_wide_auditors=True,
        )
        return TokenVerifier(issuer=None, oidc=trust, also_audiences=(auditor_api_audience(name),))

    msp, dnic = server("UY/GOV/MSP/ss1"), server("UY/GOV/DNIC/ss1")
    try:
        assert (await msp.verify(forwarded, now=NOW)).role is Role.AUDITOR
        with pytest.raises(AuthError, match="token audience is not"):
            await dnic.verify(forwarded, now=NOW)
        with pytest.raises(AuthError, match="token audience is not"):
            await TokenVerifier(issuer=registry).verify(forwarded, now=NOW)
        # the auditors' own tokens (the registry's audience) are taken by every server
        own = registry.issue(subject="carla", role=Role.AUDITOR, now=NOW, ttl=timedelta(minutes=1))
        assert (await dnic.verify(own, now=NOW)).subject == "carla"
    finally:
        await msp.close()
        await dnic.close()
