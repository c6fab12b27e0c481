"""Unit tests of gateway_ops.auth: the registry's own tokens, issued and verified without I/O.

Times are fixed in the past: a verifier that consulted the real clock would refuse every
token here as expired, so the round trips also show that `now` is the reference time.
"""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import hmac
import json
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.identifiers import MemberId, SecurityServerId
from gateway_ops.auth import (
    AuthError,
    OidcSettings,
    Principal,
    Role,
    TokenIssuer,
    TokenVerifier,
    load_or_create_token_key,
)

NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
TTL = timedelta(minutes=15)
LEEWAY = timedelta(seconds=30)
ISSUER = "https://registry.gateway.example"
AUDIENCE = "gateway-registry-admin"
MSP = MemberId.parse("UY/GOV/MSP")
MSP_SS1 = SecurityServerId.parse("UY/GOV/MSP/ss1")


@pytest.fixture(scope="module")
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def issuer(key: ec.EllipticCurvePrivateKey) -> TokenIssuer:
    return TokenIssuer(key, issuer=ISSUER, audience=AUDIENCE)


@pytest.fixture
def verifier(issuer: TokenIssuer) -> TokenVerifier:
    return TokenVerifier(issuer=issuer, leeway_seconds=LEEWAY.total_seconds())


def claims(**changes: Any) -> dict[str, Any]:
    """Valid claims of a member-admin token of the registry at NOW, with `changes` applied."""
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "alice",
        "iat": int(NOW.timestamp()),
        "nbf": int(NOW.timestamp()),
        "exp": int((NOW + TTL).timestamp()),
        "jti": "j1",
        "gateway_role": "member-admin",
        "gateway_member": str(MSP),
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(obj: dict[str, Any]) -> str:
    return b64(json.dumps(obj).encode())


async def refused(verifier: TokenVerifier, token: str, *, now: datetime = NOW) -> str:
    """The AuthError message for a token the verifier must refuse."""
    with pytest.raises(AuthError) as info:
        await verifier.verify(token, now=now)
    return info.value.message


@pytest.mark.parametrize(
    ("role", "member", "server", "expected_member"),
    [
        (Role.REGISTRY_ADMIN, None, None, None),
        (Role.MEMBER_ADMIN, MSP, None, MSP),
        (Role.AUDITOR, MSP, None, MSP),
        (Role.AUDITOR, None, None, None),
        (Role.SECURITY_SERVER, None, MSP_SS1, MSP),
    ],
)
async def test_issue_verify_round_trip(
    issuer: TokenIssuer,
    verifier: TokenVerifier,
    role: Role,
    member: MemberId | None,
    server: SecurityServerId | None,
    expected_member: MemberId | None,
) -> None:
    """A token the registry issues verifies to the same subject, role and scope."""
    token = issuer.issue(subject="alice", role=role, member=member, server=server, now=NOW, ttl=TTL)
    principal = await verifier.verify(token, now=NOW + TTL / 2)
    assert principal == Principal(
        subject="alice", role=role, member=expected_member, server=server, issuer=ISSUER
    )


async def test_jwks_verifies_issued_tokens(issuer: TokenIssuer) -> None:
    """The published JWKS holds the key that verifies the registry's tokens, under its kid."""
    token = issuer.issue(subject="alice", role=Role.REGISTRY_ADMIN, now=NOW, ttl=TTL)
    (jwk,) = issuer.jwks()["keys"]
    assert (jwk["kid"], jwk["use"], jwk["alg"], jwk["crv"]) == (
        issuer.key_id,
        "sig",
        "ES256",
        "P-256",
    )
    assert "d" not in jwk
    assert jwt.get_unverified_header(token)["kid"] == issuer.key_id
    decoded = jwt.decode(
        token,
        jwt.PyJWK(jwk),
        algorithms=["ES256"],
        audience=AUDIENCE,
        options={"verify_exp": False},
    )
    assert decoded["gateway_role"] == "registry-admin"


def test_key_id_is_digest_of_public_key(
    key: ec.EllipticCurvePrivateKey, issuer: TokenIssuer
) -> None:
    """The key id is base64url of the first 16 bytes of SHA-256 over the public key's SPKI DER."""
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert issuer.key_id == b64(hashlib.sha256(spki).digest()[:16])


def test_issued_tokens_are_distinct(issuer: TokenIssuer) -> None:
    """Two tokens issued at the same moment differ by their random jti."""
    first, second = (
        issuer.issue(subject="alice", role=Role.REGISTRY_ADMIN, now=NOW, ttl=TTL) for _ in range(2)
    )
    assert (
        jwt.decode(first, options={"verify_signature": False})["jti"]
        != jwt.decode(second, options={"verify_signature": False})["jti"]
    )


async def test_expired_token_refused(issuer: TokenIssuer, verifier: TokenVerifier) -> None:
    """A token is refused once `now` reaches its expiry plus the leeway."""
    token = issuer.issue(subject="alice", role=Role.REGISTRY_ADMIN, now=NOW, ttl=TTL)
    message = await refused(verifier, token, now=NOW + TTL + LEEWAY)
    assert message == "token expired at 2025-06-01T12:15:00.000000Z"


async def test_expired_token_accepted_within_leeway(
    issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    """A token just past its expiry but within the leeway is still accepted."""
    token = issuer.issue(subject="alice", role=Role.REGISTRY_ADMIN, now=NOW, ttl=TTL)
    principal = await verifier.verify(token, now=NOW + TTL + LEEWAY - timedelta(seconds=1))
    assert principal.role is Role.REGISTRY_ADMIN


async def test_not_yet_valid_token_refused(
    key: ec.EllipticCurvePrivateKey, issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    """A token whose nbf is later than `now` plus the leeway is refused."""
    later = NOW + timedelta(hours=1)
    token = jwt.encode(
        claims(nbf=int(later.timestamp()), exp=int((later + TTL).timestamp())),
        key,
        algorithm="ES256",
        headers={"kid": issuer.key_id},
    )
    assert await refused(verifier, token) == "token is not valid before 2025-06-01T13:00:00.000000Z"


async def test_token_issued_in_the_future_refused(
    key: ec.EllipticCurvePrivateKey, issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    """A token whose iat is later than `now` plus the leeway is refused."""
    token = jwt.encode(
        claims(iat=int((NOW + timedelta(minutes=5)).timestamp()), nbf=None),
        key,
        algorithm="ES256",
        headers={"kid": issuer.key_id},
    )
    assert "issued in the future" in await refused(verifier, token)


async def test_token_without_expiry_refused(
    key: ec.EllipticCurvePrivateKey, issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    """A correctly signed token without an exp claim is refused."""
    token = jwt.encode(claims(exp=None), key, algorithm="ES256", headers={"kid": issuer.key_id})
    assert await refused(verifier, token) == "token has no 'exp' claim"


async def test_signature_by_another_key_refused(
    issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    """A token signed by another P-256 key with the registry's kid and issuer is refused."""
    other = ec.generate_private_key(ec.SECP256R1())
    token = jwt.encode(claims(), other, algorithm="ES256", headers={"kid": issuer.key_id})
    assert await refused(verifier, token) == "token signature does not verify"


async def test_unknown_registry_key_id_refused(
    key: ec.EllipticCurvePrivateKey, verifier: TokenVerifier
) -> None:
    """A token of the registry's issuer naming a key id other than the registry's is refused."""
    token = jwt.encode(claims(), key, algorithm="ES256", headers={"kid": "old-key"})
    assert (
        await refused(verifier, token) == "token key id 'old-key' is not the registry's signing key"
    )


async def test_alg_none_refused(issuer: TokenIssuer, verifier: TokenVerifier) -> None:
    """An unsigned token (alg none) is refused, even with valid claims of the registry."""
    header = {"alg": "none", "typ": "JWT", "kid": issuer.key_id}
    token = f"{b64json(header)}.{b64json(claims(gateway_role='registry-admin'))}."
    assert await refused(verifier, token) == "algorithm 'none' is not accepted"


async def test_hmac_with_public_key_as_secret_refused(
    issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    """An HS256 token whose HMAC secret is the registry's public key PEM is refused."""
    secret = issuer.public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signing_input = (
        f"{b64json({'alg': 'HS256', 'typ': 'JWT', 'kid': issuer.key_id})}.{b64json(claims())}"
    )
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    token = f"{signing_input}.{b64(signature)}"
    assert await refused(verifier, token) == "algorithm 'HS256' is not accepted"


async def test_other_algorithm_for_registry_issuer_refused(
    issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    """A token claiming the registry as issuer but signed with RS256 is refused."""
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": issuer.key_id})
    assert "algorithm 'RS256' is not accepted for issuer" in await refused(verifier, token)


async def test_wrong_audience_refused(
    key: ec.EllipticCurvePrivateKey, verifier: TokenVerifier
) -> None:
    """A token of the registry issued for another audience is refused."""
    other = TokenIssuer(key, issuer=ISSUER, audience="another-service")
    token = other.issue(subject="alice", role=Role.REGISTRY_ADMIN, now=NOW, ttl=TTL)
    assert await refused(verifier, token) == f"token audience is not {AUDIENCE!r}"


async def test_tampered_payload_refused(issuer: TokenIssuer, verifier: TokenVerifier) -> None:
    """A member-admin token whose payload is edited to registry-admin is refused."""
    token = issuer.issue(subject="alice", role=Role.MEMBER_ADMIN, member=MSP, now=NOW, ttl=TTL)
    header, payload, signature = token.split(".")
    decoded = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    decoded.update(gateway_role="registry-admin", gateway_member=None)
    tampered = f"{header}.{b64json(decoded)}.{signature}"
    assert await refused(verifier, tampered) == "token signature does not verify"


@pytest.mark.parametrize(
    ("role", "member", "server", "problem"),
    [
        (Role.MEMBER_ADMIN, None, None, "a member-admin needs a member"),
        (Role.SECURITY_SERVER, MSP, None, "a security-server needs a server"),
        (Role.REGISTRY_ADMIN, MSP, None, "a registry-admin is not scoped"),
        (Role.AUDITOR, None, MSP_SS1, "an auditor is scoped to a member or to the instance"),
        (Role.SECURITY_SERVER, MemberId.parse("UY/GOV/DNIC"), MSP_SS1, "is owned by UY/GOV/MSP"),
    ],
)
def test_issue_refuses_scope_that_does_not_fit_role(
    issuer: TokenIssuer,
    role: Role,
    member: MemberId | None,
    server: SecurityServerId | None,
    problem: str,
) -> None:
    """Issuing refuses a scope that does not fit the role, saying what is missing or extra."""
    with pytest.raises(ValueError, match=problem):
        issuer.issue(subject="alice", role=role, member=member, server=server, now=NOW, ttl=TTL)


async def test_member_admin_token_without_member_refused(
    key: ec.EllipticCurvePrivateKey, issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    """A correctly signed member-admin token without a member claim is refused."""
    token = jwt.encode(
        claims(gateway_member=None), key, algorithm="ES256", headers={"kid": issuer.key_id}
    )
    assert "a member-admin needs a member" in await refused(verifier, token)


async def test_malformed_member_claim_refused(
    key: ec.EllipticCurvePrivateKey, issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    """A member claim that is not a member identifier is refused, naming the claim."""
    token = jwt.encode(
        claims(gateway_member="UY/GOV"), key, algorithm="ES256", headers={"kid": issuer.key_id}
    )
    message = await refused(verifier, token)
    assert message.startswith("gateway_member claim 'UY/GOV' is not a member identifier: ")


async def test_malformed_server_claim_refused(
    key: ec.EllipticCurvePrivateKey, issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    """A server claim that is not a security server identifier is refused, naming the claim."""
    token = jwt.encode(
        claims(gateway_role="security-server", gateway_member=None, gateway_server="UY/GOV/MSP"),
        key,
        algorithm="ES256",
        headers={"kid": issuer.key_id},
    )
    assert (await refused(verifier, token)).startswith("gateway_server claim 'UY/GOV/MSP' is not")


async def test_missing_role_claim_refused(
    key: ec.EllipticCurvePrivateKey, issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    """A correctly signed token without a role claim is refused."""
    token = jwt.encode(
        claims(gateway_role=None), key, algorithm="ES256", headers={"kid": issuer.key_id}
    )
    assert await refused(verifier, token) == "role claim 'gateway_role' missing"


async def test_unknown_role_refused(
    key: ec.EllipticCurvePrivateKey, issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    """A role claim naming no known role is refused."""
    token = jwt.encode(
        claims(gateway_role="superuser"), key, algorithm="ES256", headers={"kid": issuer.key_id}
    )
    assert "role claim 'gateway_role' is 'superuser'" in await refused(verifier, token)


async def test_untrusted_issuer_refused(
    key: ec.EllipticCurvePrivateKey, issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    """A token from an issuer that is neither the registry nor the OIDC provider is refused."""
    token = jwt.encode(
        claims(iss="https://evil.example"), key, algorithm="ES256", headers={"kid": issuer.key_id}
    )
    assert await refused(verifier, token) == "token issuer 'https://evil.example' is not trusted"


async def test_what_a_refusal_repeats_of_a_tokens_own_text_is_cut_short(
    key: ec.EllipticCurvePrivateKey, issuer: TokenIssuer, verifier: TokenVerifier
) -> None:
    """An issuer, key id or algorithm of thousands of characters is the caller's text: the
    refusal (answered, and logged) repeats at most 300 characters of it (red-team review:
    5 KB of log per request)."""
    for token in (
        jwt.encode(claims(iss="x" * 5000), key, algorithm="ES256", headers={"kid": issuer.key_id}),
        jwt.encode(claims(), key, algorithm="ES256", headers={"kid": "k" * 5000}),
        b64json({"alg": "A" * 5000, "typ": "JWT"}) + "." + b64json(claims()) + ".c2ln",
    ):
        message = await refused(verifier, token)
        assert len(message) <= 300 and message.endswith(" [cut]"), message[:80]


@pytest.mark.parametrize(
    "token", ["", "garbage", "a.b.c", "....", "eyJhbGciOiJFUzI1NiJ9.bm90IGpzb24.c2ln"]
)
async def test_garbage_refused(verifier: TokenVerifier, token: str) -> None:
    """Strings that are not JWTs are refused with AuthError, not another exception."""
    await refused(verifier, token)


def test_load_or_create_token_key_creates_private_file_and_reloads(tmp_path: Path) -> None:
    """The key file is created with mode 0600 (parents too), and loading it gives the same key."""
    path = tmp_path / "state" / "keys" / "token-signing.key"
    created = load_or_create_token_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert list(path.parent.iterdir()) == [path]
    reloaded = load_or_create_token_key(path)
    assert reloaded.private_numbers() == created.private_numbers()


def test_replicas_creating_the_token_key_together_end_with_one_key(tmp_path: Path) -> None:
    """Registry replicas starting at once over one folder: every one of them loads the key
    the first one wrote, so a token one issues is accepted by the others."""
    path = tmp_path / "token-signing.key"
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        keys = list(pool.map(lambda _: load_or_create_token_key(path), range(16)))
    assert len({k.private_numbers().private_value for k in keys}) == 1
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left


def test_load_or_create_token_key_refuses_other_key_types(tmp_path: Path) -> None:
    """An existing key file that is not an EC P-256 key is refused, naming the file."""
    path = tmp_path / "token-signing.key"
    path.write_bytes(
        ec.generate_private_key(ec.SECP384R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(ValueError, match="must be an EC P-256 key"):
        load_or_create_token_key(path)


@pytest.mark.parametrize(
    ("jwks_url", "accepted"),
    [
        ("https://idp.example/jwks", True),
        ("http://127.0.0.1:7080/.well-known/jwks.json", True),
        ("http://[::1]/jwks", True),
        # keys fetched over plain http off the host could be replaced by anyone on the path,
        # and tokens forged with them
        ("http://idp.example/jwks", False),
        ("http://127.0.0.1.evil.example/jwks", False),
        ("ftp://idp.example/jwks", False),
    ],
)
def test_token_keys_are_fetched_over_https_except_on_loopback(
    jwks_url: str, accepted: bool
) -> None:
    def settings() -> OidcSettings:
        return OidcSettings(jwks_url=jwks_url, issuer="https://idp.example", audience="gw")

    if accepted:
        assert settings().jwks_url == jwks_url
    else:
        with pytest.raises(ValueError, match="must be an https URL"):
            settings()


@pytest.mark.parametrize("algorithm", ["none", "NONE", "HS256", "hs512"])
def test_symmetric_and_unsigned_token_algorithms_are_refused_in_settings(algorithm: str) -> None:
    with pytest.raises(ValueError, match="is not accepted"):
        OidcSettings(
            jwks_url="https://idp.example/jwks",
            issuer="https://idp.example",
            audience="gw",
            algorithms=("RS256", algorithm),
        )
