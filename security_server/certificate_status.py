"""OCSP status of certificates: fetched for our own, checked when stapled by peers.

`OwnStatus` fetches, every `ocsp.refresh_seconds`, the OCSP status of this server's
authentication certificate and of each member signing certificate it holds from the
responder at `ocsp.url` (RFC 6960 over HTTP, so a national CA's responder replaces ours by
configuration), keeps the last answer on disk (`STATE_DIR/ocsp/`), and hands it out to be
stapled: to every signed envelope (`signer_ocsp`) and to each exchange stream (`ocsp_staple`).

`StatusChecker` checks a stapled answer: issued for that certificate by its CA (or a
responder the CA delegated to), no older than `ocsp.freshness_seconds`, and "good".
A verified answer is cached, so the signature of each answer is checked once; freshness is
checked on every use. A server checks its own staples the same way before it sends, so it
refuses locally what its peers would refuse.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import aiohttp
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import ocsp

from gateway.configuration import GlobalConfiguration, SecurityServer
from gateway.errors import Code, GatewayError, TrustError
from gateway.ocsp import CertStatus, StatusCache, build_request, check_response
from gateway.signing import certificate_fingerprint
from gateway.timeutil import format_time
from security_server.private_files import open_private
from security_server.settings import OcspSection

log = structlog.get_logger("security_server.ocsp")


def der_sha256(certificate: x509.Certificate) -> str:
    """The SHA-256 of a certificate's DER, in hex (once per certificate object)."""
    return certificate_fingerprint(certificate).hex()


class StatusChecker:
    """Checks stapled OCSP answers against the CAs of the current configuration."""

    def __init__(self, freshness_seconds: float) -> None:
        self.freshness = timedelta(seconds=freshness_seconds)
        self._cache = StatusCache()
        # (instance, configuration version, certificate SHA-256) -> (CA, its SHA-256, its
        # DER): with federation, several instances' configurations are in use at once
        self._issuers: dict[tuple[str, int, bytes], tuple[x509.Certificate, str, bytes]] = {}

    def issuer(
        self, certificate: x509.Certificate, config: GlobalConfiguration
    ) -> tuple[x509.Certificate, str, bytes]:
        """The configuration's CA that issued `certificate`, with the SHA-256 and DER of it."""
        key = (config.instance, config.version, certificate_fingerprint(certificate))
        found = self._issuers.get(key)
        if found is None:
            ca = config.trust.issuer_of(certificate)
            der = ca.public_bytes(serialization.Encoding.DER)
            found = (ca, hashlib.sha256(der).hexdigest(), der)
            if len(self._issuers) > 10_000:
                self._issuers.clear()
            self._issuers[key] = found
        return found

    def check(
        self,
        staple: bytes,
        certificate: x509.Certificate,
        config: GlobalConfiguration,
        at: datetime,
        *,
        revoked: Code,
        what: str,
    ) -> None:
        """Raise unless `staple` says `certificate` is good, freshly; `revoked` is the code for revoked."""
        if not staple:
            raise TrustError(
                f"no OCSP status of the {what} was stapled", code=Code.CERTIFICATE_STATUS_INVALID
            )
        try:
            info = self._cache.check(
                staple,
                certificate=certificate,
                issuer=self.issuer(certificate, config)[0],
                at=at,
                freshness=self.freshness,
            )
        except TrustError as err:
            raise TrustError(f"{what}: {err.message}", code=err.code) from None
        if info.status is CertStatus.REVOKED:
            when = info.revoked_at.isoformat() if info.revoked_at else "an unknown time"
            raise TrustError(
                f"the {what} was revoked by its CA at {when}"
                + (f" ({info.reason})" if info.reason else ""),
                code=revoked,
            )
        if info.status is not CertStatus.GOOD:
            raise TrustError(
                f"the {what} is unknown to its CA's OCSP responder",
                code=Code.CERTIFICATE_STATUS_INVALID,
            )

    def signer(
        self,
        staple: bytes,
        certificate: x509.Certificate,
        config: GlobalConfiguration,
        at: datetime,
    ) -> None:
        self.check(
            staple,
            certificate,
            config,
            at,
            revoked=Code.SIGNER_CERTIFICATE_REVOKED,
            what="signing certificate",
        )

    def peer(
        self,
        staple: bytes,
        certificate: x509.Certificate,
        config: GlobalConfiguration,
        at: datetime,
    ) -> None:
        self.check(
            staple,
            certificate,
            config,
            at,
            revoked=Code.PEER_CERTIFICATE_REVOKED,
            what="security server's authentication certificate",
        )

    def peer_server(
        self, staple: bytes, server: SecurityServer, config: GlobalConfiguration, at: datetime
    ) -> None:
        """Raise unless `staple` says one of the server's registered authentication
        certificates is good (during a renewal it presents either)."""
        first: TrustError | None = None
        for certificate in server.auth_x509s:
            try:
                self.peer(staple, certificate, config, at)
                return
            except TrustError as err:
                if err.code is Code.PEER_CERTIFICATE_REVOKED or len(server.auth_x509s) == 1:
                    raise
                first = first or err
        assert first is not None
        raise first


class OwnStatus:
    """The latest OCSP answers about this server's own certificates, kept fresh."""

    def __init__(
        self,
        *,
        settings: OcspSection,
        certificates: list[x509.Certificate],
        folder: Path,
        config: Callable[[], GlobalConfiguration | None],
        clock: Callable[[], datetime],
    ) -> None:
        self.clock = clock
        self.settings = settings
        self.certificates = {der_sha256(c): c for c in certificates}
        self.folder = folder
        self.config = config
        self.staples: dict[str, bytes] = {}
        for sha in self.certificates:
            with contextlib.suppress(OSError):
                self.staples[sha] = (folder / f"{sha}.der").read_bytes()

    def staple(self, certificate_sha256: str) -> bytes:
        return self.staples.get(certificate_sha256, b"")

    def produced_at(self, certificate_sha256: str) -> datetime | None:
        """When the OCSP answer held about one of our certificates was produced (None: none
        held, or unreadable)."""
        der = self.staples.get(certificate_sha256)
        if not der:
            return None
        try:
            return ocsp.load_der_ocsp_response(der).produced_at_utc
        except ValueError:
            return None

    def stale(self) -> str | None:
        """Why this server's own OCSP answers would be refused by its peers now (none
        configured, missing, or past `ocsp.freshness_seconds`); None when all are fresh."""
        if not self.settings.url:
            return "ocsp.url is not set: peers refuse this server's messages"
        config = self.config()
        if config is None:
            return "no configuration yet to check the OCSP answers against"
        now = self.clock()
        freshness = timedelta(seconds=self.settings.freshness_seconds)
        for sha, certificate in self.certificates.items():
            der = self.staples.get(sha)
            if not der:
                return f"no OCSP answer yet for certificate {sha[:16]}"
            try:
                check_response(
                    der,
                    certificate=certificate,
                    issuer=config.trust.issuer_of(certificate),
                    at=now,
                    freshness=freshness,
                )
            except GatewayError as exc:
                return f"the OCSP answer for certificate {sha[:16]} is unusable: {exc.message}"
        return None

    async def run(self, first: asyncio.Event | None = None) -> None:
        """Refresh every certificate's status until cancelled (sooner after a failure);
        `first` is set once the first round has been tried."""
        first = first or asyncio.Event()
        if not self.settings.url:
            first.set()
            log.warning(
                "ocsp_not_configured",
                detail="ocsp.url is empty: peers will refuse this server's messages",
            )
            return
        timeout = aiohttp.ClientTimeout(total=self.settings.timeout_seconds)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                ok = await self.refresh(session)
                first.set()
                await asyncio.sleep(
                    self.settings.refresh_seconds if ok else min(self.settings.refresh_seconds, 2.0)
                )

    async def refresh(self, session: aiohttp.ClientSession) -> bool:
        """Fetch every certificate's status once; False if any could not be fetched."""
        config = self.config()
        if config is None:
            return False
        ok = True
        for sha, certificate in list(self.certificates.items()):
            try:
                await self._fetch(session, sha, certificate, config)
            except GatewayError as exc:
                ok = False
                log.warning("ocsp_fetch_failed", certificate=sha, error=exc.message)
        return ok

    async def _fetch(
        self,
        session: aiohttp.ClientSession,
        sha: str,
        certificate: x509.Certificate,
        config: GlobalConfiguration,
    ) -> CertStatus:
        """Fetch and keep one certificate's answer, and return the status it gives;
        `GatewayError` saying why not."""
        try:
            issuer = config.trust.issuer_of(certificate)
            async with session.post(
                self.settings.url,
                data=build_request(certificate, issuer),
                headers={"Content-Type": "application/ocsp-request"},
            ) as answer:
                if answer.status != 200:
                    raise OSError(f"HTTP {answer.status}")
                der = await answer.read()
            # only an answer that verifies replaces the one we hold
            info = check_response(
                der,
                certificate=certificate,
                issuer=issuer,
                at=self.clock(),
                freshness=timedelta(seconds=self.settings.freshness_seconds),
            )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise GatewayError(str(exc) or type(exc).__name__) from None
        if der != self.staples.get(sha):
            # an answer older than the one held is never taken: whoever sits between this
            # server and its responder (OCSP is plain HTTP) could otherwise replay a "good"
            # answer over the "revoked" one, and this server would staple it while fresh
            held_at = self.produced_at(sha)
            if held_at is not None and info.produced_at < held_at:
                raise GatewayError(
                    f"the answer fetched was produced at {format_time(info.produced_at)}, "
                    f"before the one held ({format_time(held_at)}): an older answer is not "
                    "taken"
                )
            self.staples[sha] = der
            self._persist(sha, der)
        return info.status

    async def take(self, certificates: list[x509.Certificate]) -> None:
        """Fetch a good answer about each of these certificates now and keep them fresh from
        then on (a renewal's, before it is used); `GatewayError` if any is not obtained."""
        config = self.config()
        if config is None:
            raise GatewayError("no configuration yet to check OCSP answers against")
        if not self.settings.url:
            raise GatewayError("ocsp.url is not set: peers would refuse the new certificates")
        timeout = aiohttp.ClientTimeout(total=self.settings.timeout_seconds)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for certificate in certificates:
                sha = der_sha256(certificate)
                try:
                    status = await self._fetch(session, sha, certificate, config)
                except GatewayError as exc:
                    raise GatewayError(
                        f"no usable OCSP answer about certificate {sha[:16]}: {exc.message}"
                    ) from None
                if status is not CertStatus.GOOD:
                    raise GatewayError(
                        f"certificate {sha[:16]} is {status.value} according to its CA"
                    )
        for certificate in certificates:
            self.certificates[der_sha256(certificate)] = certificate

    def keep_only(self, certificates: list[x509.Certificate]) -> None:
        """Stop refreshing the answers about certificates no longer used (those held stay
        available to streams still open with them)."""
        self.certificates = {der_sha256(c): c for c in certificates}

    def _persist(self, sha: str, der: bytes) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{sha}.der"
        tmp = path.with_name(path.name + ".tmp")
        with open_private(tmp) as f:
            f.write(der)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
