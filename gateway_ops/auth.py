"""Who is calling the registry's admin API: bearer tokens in, a `Principal` out.

Two kinds of issuer are trusted, and nothing else:

- the registry itself: `TokenIssuer` signs short-lived ES256 tokens with the registry's
  token-signing key (P-256, `load_or_create_token_key`) and publishes its public key as a
  JWKS;
- optionally one external OpenID Connect provider (`OidcSettings`): its keys are fetched
  from its JWKS URL, cached, and refetched when a token names an unknown key id (at most
  once every 10 seconds, so a flood of forged key ids cannot hammer the provider).

`TokenVerifier.verify` reads the unverified header and `iss` claim only to choose the key
and the accepted algorithms; everything it returns comes from a verified token. The
reference time is the `now` passed in: this module never reads the clock.

This module must never accept `alg: none` or an HMAC algorithm (a public key must never
become an HMAC secret), never fall back to another issuer's key, and never log a token.
An `AuthError` message is safe to show the caller: it says what is wrong with the token,
and never includes internal detail such as the JWKS URL or a stack trace.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import math
import os
import secrets
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import jwt
import structlog
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from gateway.errors import Code, GatewayError, IdentifierError
from gateway.identifiers import MemberId, SecurityServerId
from gateway.timeutil import format_time

__all__ = [
    "AuthError",
    "OidcSettings",
    "Principal",
    "Role",
    "TokenIssuer",
    "TokenVerifier",
    "load_or_create_token_key",
]

log = structlog.get_logger("gateway_ops.auth")

_Id = TypeVar("_Id", MemberId, SecurityServerId)

REGISTRY_ALGORITHM = "ES256"
ROLE_CLAIM, MEMBER_CLAIM, SERVER_CLAIM = "gateway_role", "gateway_member", "gateway_server"
REQUIRED_CLAIMS = ("exp", "iat", "sub")

_MIN_REFETCH_INTERVAL = timedelta(seconds=10)
# the oldest key set still trusted when refreshing it fails
_MAX_KEY_AGE = timedelta(hours=1)
_FETCH_TIMEOUT_SECONDS = 10.0
_MAX_JWKS_BYTES = 1 << 20
# Members of a JWK that only a private or symmetric key has: never published by a sane issuer.
_SECRET_JWK_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


class Role(StrEnum):
    """What a principal may do in the admin API; the scope is in `Principal`."""

    REGISTRY_ADMIN = "registry-admin"
    MEMBER_ADMIN = "member-admin"  # scoped to one member
    AUDITOR = "auditor"  # read-only, one member, or the whole instance when member is None
    SECURITY_SERVER = "security-server"  # scoped to one security server (member = its owner)


@dataclass(frozen=True, slots=True, kw_only=True)
class Principal:
    """The authenticated caller of the admin API, built from a verified token only."""

    subject: str
    role: Role
    member: MemberId | None
    server: SecurityServerId | None
    issuer: str


# the longest message an AuthError carries
MAX_AUTH_MESSAGE_CHARS = 300


class AuthError(GatewayError):
    """Authentication failed: missing, malformed, expired, wrongly signed or unacceptable token.

    `message` says what is wrong and is safe to show the caller (the API answers 401).
    """

    code = Code.CLIENT_NOT_AUTHENTICATED

    def __init__(self, message: str, *, code: Code | None = None) -> None:
        # a refused token's own text (issuer, key id, algorithm) is the caller's to choose:
        # what an error repeats of it, to the caller and into the log, is cut short
        if len(message) > MAX_AUTH_MESSAGE_CHARS:
            message = message[: MAX_AUTH_MESSAGE_CHARS - 6] + " [cut]"
        super().__init__(message, code=code)


@dataclass(frozen=True, slots=True, kw_only=True)
class OidcSettings:
    """An external OpenID Connect provider whose tokens the registry accepts.

    `jwks_url` must be https, except on loopback (tests, a provider on the same host): keys
    fetched over plain http could be replaced by anyone on the path.
    """

    jwks_url: str
    issuer: str
    audience: str
    role_claim: str = ROLE_CLAIM
    member_claim: str = MEMBER_CLAIM
    server_claim: str = SERVER_CLAIM
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    # may a token without a member claim stand for an instance-wide auditor? Only for an
    # issuer trusted as much as the registry (a security server trusts the registry's
    # tokens through its JWKS URL); an external provider's tokens must name a member
    instance_wide_auditors: bool = False
    # the registry console's browser sign-in (authorization code with PKCE): the provider's
    # authorization and token endpoints, the console's client id, and its callback as
    # registered with the provider (https://REGISTRY/console/oidc/callback); all or none.
    # The provider's ID tokens must carry `audience` and the role claims above.
    authorization_url: str = ""
    token_url: str = ""
    client_id: str = ""
    redirect_url: str = ""

    @property
    def browser_sign_in(self) -> bool:
        return bool(self.authorization_url)

    def __post_init__(self) -> None:
        for name in ("jwks_url", "authorization_url", "token_url", "redirect_url"):
            value = getattr(self, name)
            url = urlsplit(value)
            if (
                (value or name == "jwks_url")
                and url.scheme != "https"
                and not (url.scheme == "http" and url.hostname in _LOOPBACK_HOSTS)
            ):
                raise ValueError(
                    f"OIDC {name} {value!r} must be an https URL (http only on loopback)"
                )
        flow = (self.authorization_url, self.token_url, self.client_id, self.redirect_url)
        if any(flow) and not all(flow):
            raise ValueError(
                "OIDC browser sign-in needs authorization_url, token_url, client_id and "
                "redirect_url together"
            )
        for name in ("issuer", "audience", "role_claim", "member_claim", "server_claim"):
            if not getattr(self, name):
                raise ValueError(f"OIDC {name} is empty")
        if not self.algorithms:
            raise ValueError("OIDC algorithms is empty; give at least one, such as RS256")
        for alg in self.algorithms:
            if _forbidden_algorithm(alg):
                raise ValueError(f"OIDC algorithm {alg!r} is not accepted: use RS*, PS* or ES*")


def _forbidden_algorithm(alg: str) -> bool:
    return alg.lower() == "none" or alg.upper().startswith("HS")


def _scope_problem(
    role: Role, member: MemberId | None, server: SecurityServerId | None
) -> str | None:
    """Why this role cannot have this scope, or None when it can (one rule for issue and verify)."""
    match role:
        case Role.REGISTRY_ADMIN:
            if member is not None or server is not None:
                return "a registry-admin is not scoped to a member or a security server"
        case Role.MEMBER_ADMIN:
            if member is None:
                return "a member-admin needs a member"
            if server is not None:
                return "a member-admin is scoped to a member, not to a security server"
        case Role.AUDITOR:
            if server is not None:
                return "an auditor is scoped to a member or to the instance, not to a server"
        case Role.SECURITY_SERVER:
            if server is None:
                return "a security-server needs a server"
            if member is not None and member != server.owner:
                return f"security server {server} is owned by {server.owner}, not by {member}"
    return None


def _key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """base64url (no padding) of the first 16 bytes of SHA-256 over the SPKI DER."""
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.urlsafe_b64encode(hashlib.sha256(spki).digest()[:16]).rstrip(b"=").decode()


def _timestamp(moment: datetime) -> int:
    if moment.tzinfo is None:
        raise ValueError("naive datetime: every time in the gateway is timezone-aware UTC")
    return int(moment.timestamp())


class TokenIssuer:
    """Issues the registry's own tokens: ES256 with the registry's token-signing key (P-256)."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, *, issuer: str, audience: str) -> None:
        if not isinstance(key.curve, ec.SECP256R1):
            raise ValueError(f"the token-signing key must be P-256, not {key.curve.name}")
        if not issuer or not audience:
            raise ValueError("the token issuer and audience must not be empty")
        self._key = key
        self.public_key = key.public_key()
        self.issuer = issuer
        self.audience = audience
        self.key_id = _key_id(self.public_key)

    def derived_secret(self, purpose: str) -> bytes:
        """A 32-byte secret for `purpose` derived from the token-signing key: the same in
        every registry process that shares the key, and telling nothing about the key."""
        private = self._key.private_numbers().private_value.to_bytes(32, "big")
        return hmac.new(private, b"gateway-derived-secret\0" + purpose.encode(), "sha256").digest()

    def issue(
        self,
        *,
        subject: str,
        role: Role,
        member: MemberId | None = None,
        server: SecurityServerId | None = None,
        now: datetime,
        ttl: timedelta,
        audience: str | None = None,
    ) -> str:
        """A signed token for `subject`; ValueError when the scope does not fit the role.
        `audience`: another than the registry's own, for a token good at one place only
        (`auditor_api_audience`)."""
        if not subject:
            raise ValueError("cannot issue a token: the subject is empty")
        if ttl <= timedelta(0):
            raise ValueError(f"cannot issue a token: the lifetime must be positive, not {ttl}")
        problem = _scope_problem(role, member, server)
        if problem is not None:
            raise ValueError(f"cannot issue a {role} token: {problem}")
        if server is not None:
            member = server.owner
        issued_at = _timestamp(now)
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": audience or self.audience,
            "sub": subject,
            "iat": issued_at,
            "nbf": issued_at,
            "exp": _timestamp(now + ttl),
            "jti": secrets.token_urlsafe(16),
            ROLE_CLAIM: role.value,
            MEMBER_CLAIM: None if member is None else str(member),
            SERVER_CLAIM: None if server is None else str(server),
        }
        return jwt.encode(
            claims, self._key, algorithm=REGISTRY_ALGORITHM, headers={"kid": self.key_id}
        )

    def jwks(self) -> dict[str, Any]:
        """The public key as a JWK Set, for whoever verifies the registry's tokens."""
        jwk = ECAlgorithm.to_jwk(self.public_key, as_dict=True)
        return {"keys": [{**jwk, "kid": self.key_id, "use": "sig", "alg": REGISTRY_ALGORITHM}]}


def load_or_create_token_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Load the token-signing key (PEM PKCS8), creating it (mode 0600, atomically) if absent."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return _create_token_key(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError(f"{path}: the token-signing key must be an EC P-256 key")
    return key


def _create_token_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    # mkstemp creates the file with mode 0600, in the same directory; os.link then names it
    # only if no key is there yet: registry replicas starting together over a shared folder
    # end up with one key (the first one linked), so each accepts the others' tokens
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links: create it exclusively instead
            with open(path, "xb") as f:
                f.write(pem)
                f.flush()
                os.fsync(f.fileno())
    except FileExistsError:
        return load_or_create_token_key(path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    log.info("token_key_created", path=str(path), kid=_key_id(key.public_key()))
    return key


@dataclass(frozen=True, slots=True, kw_only=True)
class _Trust:
    """What one trusted issuer's tokens must satisfy, and where its claims are."""

    issuer: str
    audience: str
    algorithms: tuple[str, ...]
    role_claim: str
    member_claim: str
    server_claim: str
    instance_wide_auditors: bool = False
    # audiences accepted besides `audience` (a security server's own: auditor_api_audience)
    also: tuple[str, ...] = ()


def auditor_api_audience(server: SecurityServerId | str) -> str:
    """The audience of a token the registry's console forwards to one security server's
    auditor API: good there only, never at the registry (whose tokens have its own audience)
    nor at another server, which a server receiving it could otherwise replay it to."""
    return f"gateway-auditor-api:{server}"


class _KeySet:
    """The signing keys an OIDC provider publishes at its JWKS URL, fetched and cached.

    Refetched when older than `refresh`, or when a token names a key id not in the set; at
    most one attempt every 10 seconds (measured with the `now` of the calls). A token
    naming a key held is checked at once, its set refreshed beside it when due: a slow or
    unreachable endpoint never holds it up (found by a red-team review: every sign-in
    waited behind a refetch that any caller could start with an unknown key id). When a
    refresh fails, the keys already fetched stay in use, for _MAX_KEY_AGE at most: a key the
    provider removed is not trusted for ever because its endpoint no longer answers.
    """

    def __init__(self, settings: OidcSettings, *, refresh: timedelta) -> None:
        self._settings = settings
        self._refresh = refresh
        self._keys: tuple[dict[str, Any], ...] = ()
        self._fetched_at: datetime | None = None
        self._attempted_at: datetime | None = None
        self._failure: str | None = None
        self._lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None
        self._refreshing: asyncio.Task[None] | None = None

    async def key(self, kid: str | None, alg: str, now: datetime) -> jwt.PyJWK:
        """The key that must have signed a token with this `kid` and `alg`."""
        if self._fetched_at is not None and abs(now - self._fetched_at) > _MAX_KEY_AGE:
            self._keys = ()  # too old to trust: fetched again, or none at all
        if self._needs_fetch(kid, now) and self._may_attempt(now):
            if self._find(kid):
                self._attempted_at = now
                if self._refreshing is None or self._refreshing.done():
                    self._refreshing = asyncio.ensure_future(self._locked_fetch(now))
            else:
                async with self._lock:  # one fetch for the requests waiting on it
                    if self._needs_fetch(kid, now) and self._may_attempt(now):
                        await self._fetch(now)
        issuer = self._settings.issuer
        found = self._find(kid)
        if not found:
            if self._failure is not None:
                raise AuthError(f"cannot fetch the keys of issuer {issuer!r}: {self._failure}")
            if kid is None:
                raise AuthError(
                    f"token has no key id (kid) and issuer {issuer!r} publishes "
                    f"{len(self._keys)} keys"
                )
            raise AuthError(f"token key id {kid!r} is not among the keys of issuer {issuer!r}")
        jwk = next((k for k in found if k.get("alg", alg) == alg), None)
        if jwk is None:
            raise AuthError(
                f"token algorithm {alg!r} does not match the algorithm {found[0]['alg']!r} "
                f"of key {kid!r} of issuer {issuer!r}"
            )
        try:
            return jwt.PyJWK(jwk, algorithm=alg)
        except jwt.PyJWTError:
            raise AuthError(
                f"token algorithm {alg!r} does not suit key {kid!r} of issuer {issuer!r}"
            ) from None

    async def _locked_fetch(self, now: datetime) -> None:
        async with self._lock:
            await self._fetch(now)

    def _find(self, kid: str | None) -> list[dict[str, Any]]:
        if kid is None:
            return list(self._keys) if len(self._keys) == 1 else []
        return [k for k in self._keys if k.get("kid") == kid]

    def _needs_fetch(self, kid: str | None, now: datetime) -> bool:
        if self._fetched_at is None or abs(now - self._fetched_at) >= self._refresh:
            return True
        return not self._find(kid)

    def _may_attempt(self, now: datetime) -> bool:
        return self._attempted_at is None or abs(now - self._attempted_at) >= _MIN_REFETCH_INTERVAL

    async def _fetch(self, now: datetime) -> None:
        """Fetch the key set; on failure keep the old one and remember why."""
        self._attempted_at = now
        url, issuer = self._settings.jwks_url, self._settings.issuer
        try:
            document = await self._download()
            keys = self._signing_keys(document)
        except _FetchError as exc:
            self._failure = exc.reason
            log.warning(
                "jwks_fetch_failed",
                issuer=issuer,
                url=url,
                reason=exc.reason,
                error=exc.detail,
                keeping=len(self._keys),
            )
            return
        self._keys, self._fetched_at, self._failure = keys, now, None
        log.info("jwks_fetched", issuer=issuer, url=url, kids=[k.get("kid") for k in keys])

    async def _download(self) -> Any:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=_FETCH_TIMEOUT_SECONDS)
            )
        try:
            async with self._session.get(self._settings.jwks_url, allow_redirects=False) as resp:
                if resp.status != 200:
                    raise _FetchError(f"the key endpoint answered HTTP {resp.status}")
                body = bytearray()
                async for chunk in resp.content.iter_chunked(64 * 1024):
                    body += chunk
                    if len(body) > _MAX_JWKS_BYTES:
                        raise _FetchError("the key endpoint answered more than 1 MiB")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise _FetchError("the key endpoint cannot be reached", detail=repr(exc)) from None
        try:
            return json.loads(body)
        except ValueError as exc:
            raise _FetchError("the key endpoint did not answer JSON", detail=str(exc)) from None

    def _signing_keys(self, document: Any) -> tuple[dict[str, Any], ...]:
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            raise _FetchError("the key endpoint did not answer a JWK Set (no 'keys' list)")
        keys = []
        for jwk in document["keys"]:
            reason = self._unusable(jwk)
            if reason is None:
                keys.append(jwk)
            else:
                kid = jwk.get("kid") if isinstance(jwk, dict) else None
                log.info("jwks_key_skipped", issuer=self._settings.issuer, kid=kid, reason=reason)
        if not keys:
            raise _FetchError("the key endpoint published no usable signing key")
        return tuple(keys)

    def _unusable(self, jwk: Any) -> str | None:
        """Why this JWK cannot verify tokens, or None when it can."""
        if not isinstance(jwk, dict):
            return "not a JSON object"
        if jwk.get("kty") == "oct" or _SECRET_JWK_MEMBERS & jwk.keys():
            return "a symmetric or private key"
        if jwk.get("use", "sig") != "sig":
            return f"use is {jwk.get('use')!r}, not 'sig'"
        if "kid" in jwk and not isinstance(jwk["kid"], str):
            return "kid is not a string"
        if "alg" in jwk and jwk["alg"] not in self._settings.algorithms:
            return f"algorithm {jwk['alg']!r} is not accepted"
        try:
            jwt.PyJWK(jwk)
        except jwt.PyJWTError as exc:
            return f"not a usable key: {exc}"
        return None

    async def close(self) -> None:
        if self._refreshing is not None:
            self._refreshing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refreshing
        if self._session is not None:
            await self._session.close()
            self._session = None


class _FetchError(Exception):
    """The JWKS could not be fetched: `reason` is safe to show, `detail` is for the log."""

    def __init__(self, reason: str, *, detail: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


class TokenVerifier:
    """Verifies bearer tokens of the registry itself and, optionally, of one OIDC provider."""

    def __init__(
        self,
        *,
        issuer: TokenIssuer | None,
        oidc: OidcSettings | None = None,
        leeway_seconds: float = 30.0,
        jwks_refresh_seconds: float = 300.0,
        also_audiences: tuple[str, ...] = (),
    ) -> None:
        """`also_audiences`: what the OIDC provider's tokens may name besides its
        audience (a security server's `auditor_api_audience`)."""
        if not (0 <= leeway_seconds < math.inf):
            raise ValueError(f"leeway_seconds must be a finite number >= 0, not {leeway_seconds}")
        if not (0 < jwks_refresh_seconds < math.inf):
            raise ValueError(f"jwks_refresh_seconds must be > 0, not {jwks_refresh_seconds}")
        if issuer is None and oidc is None:
            raise ValueError("a token verifier needs the registry's issuer or a JWKS URL")
        if oidc is not None and issuer is not None and oidc.issuer == issuer.issuer:
            raise ValueError(f"the OIDC issuer {oidc.issuer!r} is also the registry's own issuer")
        self._issuer = issuer
        self._own = (
            None
            if issuer is None
            else _Trust(
                issuer=issuer.issuer,
                audience=issuer.audience,
                algorithms=(REGISTRY_ALGORITHM,),
                role_claim=ROLE_CLAIM,
                member_claim=MEMBER_CLAIM,
                server_claim=SERVER_CLAIM,
                instance_wide_auditors=True,
            )
        )
        self._oidc: _Trust | None = None
        self._keys: _KeySet | None = None
        if oidc is not None:
            self._oidc = _Trust(
                issuer=oidc.issuer,
                audience=oidc.audience,
                algorithms=oidc.algorithms,
                role_claim=oidc.role_claim,
                member_claim=oidc.member_claim,
                server_claim=oidc.server_claim,
                instance_wide_auditors=oidc.instance_wide_auditors,
                also=also_audiences,
            )
            self._keys = _KeySet(oidc, refresh=timedelta(seconds=jwks_refresh_seconds))
        self._leeway = timedelta(seconds=leeway_seconds)

    async def verify(self, token: str, *, now: datetime) -> Principal:
        """The principal a valid token stands for; AuthError says why a token is refused."""
        if now.tzinfo is None:
            raise ValueError("naive datetime: every time in the gateway is timezone-aware UTC")
        if not isinstance(token, str) or not token:
            raise AuthError("token is empty")
        header, unverified = _unverified(token)
        alg = header.get("alg")
        if not isinstance(alg, str) or not alg:
            raise AuthError("token header has no algorithm ('alg')")
        if _forbidden_algorithm(alg):
            raise AuthError(f"algorithm {alg!r} is not accepted")
        kid = header.get("kid")
        iss = unverified.get("iss")
        if not isinstance(iss, str) or not iss:
            raise AuthError("token has no issuer ('iss') claim")

        key: ec.EllipticCurvePublicKey | jwt.PyJWK
        if self._own is not None and self._issuer is not None and iss == self._own.issuer:
            trust = self._own
            self._check_algorithm(alg, trust)
            if kid != self._issuer.key_id:
                raise AuthError(f"token key id {kid!r} is not the registry's signing key")
            key = self._issuer.public_key
        elif self._oidc is not None and self._keys is not None and iss == self._oidc.issuer:
            trust = self._oidc
            self._check_algorithm(alg, trust)
            key = await self._keys.key(kid, alg, now)
        else:
            raise AuthError(f"token issuer {iss!r} is not trusted")

        claims = _decode(token, key, alg, trust)
        self._check_times(claims, now)
        principal = _principal(claims, trust)
        if (
            not trust.instance_wide_auditors
            and principal.role is Role.AUDITOR
            and principal.member is None
        ):
            # an instance-wide auditor is too much to grant because a claim is missing
            raise AuthError(
                f"auditor tokens of {trust.issuer} must name a member in "
                f"{trust.member_claim!r}; instance-wide auditors use registry-issued tokens"
            )
        return principal

    @staticmethod
    def _check_algorithm(alg: str, trust: _Trust) -> None:
        if alg not in trust.algorithms:
            accepted = ", ".join(trust.algorithms)
            raise AuthError(
                f"algorithm {alg!r} is not accepted for issuer {trust.issuer!r} (only {accepted})"
            )

    def _check_times(self, claims: dict[str, Any], now: datetime) -> None:
        """Expiry, not-before and issued-at against `now`, with the leeway."""
        expires = _instant(claims, "exp")
        # compare `now - leeway` rather than `expires + leeway`: no overflow near year 9999
        if now - self._leeway >= expires:
            raise AuthError(f"token expired at {format_time(expires)}")
        if claims.get("nbf") is not None:
            not_before = _instant(claims, "nbf")
            if now + self._leeway < not_before:
                raise AuthError(f"token is not valid before {format_time(not_before)}")
        issued = _instant(claims, "iat")
        if issued > now + self._leeway:
            raise AuthError(f"token is issued in the future, at {format_time(issued)}")

    async def close(self) -> None:
        """Close the HTTP session of the JWKS fetches, if one was opened."""
        if self._keys is not None:
            await self._keys.close()


def _unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The header and claims, not yet verified: only to choose the key."""
    try:
        header = jwt.get_unverified_header(token)
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise AuthError(f"token is malformed: {exc}") from None
    return header, claims


def _decode(
    token: str, key: ec.EllipticCurvePublicKey | jwt.PyJWK, alg: str, trust: _Trust
) -> dict[str, Any]:
    """Verify signature, audience, issuer and required claims; times are checked against `now`."""
    try:
        return jwt.decode(
            token,
            key,
            algorithms=[alg],
            audience=[trust.audience, *trust.also],
            issuer=trust.issuer,
            options={
                "require": list(REQUIRED_CLAIMS),
                # pyjwt would compare with the real clock; `now` is the reference instead.
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
                "enforce_minimum_key_length": True,
            },
        )
    except jwt.InvalidSignatureError:
        raise AuthError("token signature does not verify") from None
    except jwt.InvalidAudienceError:
        raise AuthError(f"token audience is not {trust.audience!r}") from None
    except jwt.InvalidIssuerError:
        raise AuthError(f"token issuer is not {trust.issuer!r}") from None
    except jwt.MissingRequiredClaimError as exc:
        raise AuthError(f"token has no {exc.claim!r} claim") from None
    except jwt.InvalidAlgorithmError:
        raise AuthError(f"algorithm {alg!r} is not accepted for this key") from None
    except jwt.InvalidKeyError as exc:
        raise AuthError(f"the key of issuer {trust.issuer!r} is not accepted: {exc}") from None
    except jwt.PyJWTError as exc:
        raise AuthError(f"token is not acceptable: {exc}") from None


def _instant(claims: dict[str, Any], name: str) -> datetime:
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AuthError(f"token claim {name!r} is not a number of seconds")
    try:
        return datetime.fromtimestamp(value, UTC)
    except (OverflowError, ValueError, OSError):
        raise AuthError(f"token claim {name!r} is out of range") from None


def _principal(claims: dict[str, Any], trust: _Trust) -> Principal:
    """Map verified claims to a principal: known role, well-formed and fitting scope."""
    subject = claims["sub"]
    if not isinstance(subject, str) or not subject:
        raise AuthError("token subject ('sub') must be a non-empty string")
    value = claims.get(trust.role_claim)
    if value is None:
        raise AuthError(f"role claim {trust.role_claim!r} missing")
    try:
        role = Role(value)
    except ValueError:
        known = ", ".join(r.value for r in Role)
        raise AuthError(
            f"role claim {trust.role_claim!r} is {value!r}, not one of {known}"
        ) from None
    member = _identifier(claims, trust.member_claim, MemberId, "member identifier")
    server = _identifier(claims, trust.server_claim, SecurityServerId, "security server identifier")
    problem = _scope_problem(role, member, server)
    if problem is not None:
        raise AuthError(f"token scope is not acceptable: {problem}")
    if server is not None:
        member = server.owner
    return Principal(subject=subject, role=role, member=member, server=server, issuer=trust.issuer)


def _identifier(claims: dict[str, Any], name: str, kind: type[_Id], what: str) -> _Id | None:
    value = claims.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise AuthError(f"{name} claim is not a string, so not a {what}")
    try:
        return kind.parse(value)
    except IdentifierError as exc:
        raise AuthError(f"{name} claim {value!r} is not a {what}: {exc.message}") from None
