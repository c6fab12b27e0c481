"""OwnStatus, the OCSP answers a server holds about its own certificates, fetched from a
real responder over loopback HTTP: an answer older than the one held is never taken, so
that whoever sits between the server and its responder cannot replay an earlier "good"
answer over a "revoked" one (the server would staple it, and its peers accept it, while it
is fresh)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.x509 import ocsp

from security_server.certificate_status import OwnStatus
from security_server.settings import OcspSection
from tests.unit.conftest import build_ca, build_certificate
from tests.unit.test_ocsp import delegate, response

REAL_NOW = datetime.now(UTC)
CA = build_ca(not_before=REAL_NOW - timedelta(days=1), not_after=REAL_NOW + timedelta(days=30))
SERVER = build_certificate(
    CA,
    "UY/GOV/DNIC/ss1",
    kind="auth",
    not_before=REAL_NOW - timedelta(days=1),
    not_after=REAL_NOW + timedelta(days=30),
).certificate
RESPONDER = delegate(CA, now=REAL_NOW - timedelta(days=1))


@dataclass
class Trust:
    def issuer_of(self, certificate: x509.Certificate) -> x509.Certificate:
        return CA.certificate


@dataclass
class Configuration:
    trust: Trust


def answer(status: ocsp.OCSPCertStatus) -> bytes:
    now = datetime.now(UTC)
    return response(
        certificate=SERVER,
        issuer=CA.certificate,
        key=RESPONDER.key,
        signer=RESPONDER.certificate,
        status=status,
        this_update=now - timedelta(seconds=30),
        next_update=now + timedelta(minutes=9),
        revoked=None
        if status is ocsp.OCSPCertStatus.GOOD
        else (now - timedelta(seconds=30), x509.ReasonFlags.key_compromise),
    )


def own_status(url: str, folder: Path) -> OwnStatus:
    """A server's own status, fetched from `url` and kept in `folder`/ocsp."""
    return OwnStatus(
        settings=OcspSection(url=url),
        certificates=[SERVER],
        folder=folder / "ocsp",
        config=lambda: Configuration(Trust()),  # type: ignore[arg-type, return-value]
        clock=lambda: datetime.now(UTC),
    )


@pytest.fixture
async def responder() -> AsyncIterator[tuple[str, list[bytes]]]:
    """An OCSP responder (or whoever answers in its place) giving the answers queued."""
    queued: list[bytes] = []

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=queued.pop(0), content_type="application/ocsp-response")

    app = web.Application()
    app.router.add_post("/", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/", queued
    finally:
        await runner.cleanup()


async def test_a_newer_answer_is_taken_an_older_one_replayed_over_it_is_not(
    responder: tuple[str, list[bytes]], tmp_path: Path
) -> None:
    url, queued = responder
    status = own_status(url, tmp_path)
    good = answer(ocsp.OCSPCertStatus.GOOD)  # held first, and captured by the attacker
    await asyncio.sleep(1.1)  # answers are dated to the second
    revoked = answer(ocsp.OCSPCertStatus.REVOKED)
    queued += [good, revoked, good]
    (sha,) = status.certificates
    async with aiohttp.ClientSession() as session:
        assert await status.refresh(session)
        assert status.staple(sha) == good
        assert await status.refresh(session)  # a newer answer replaces the one held
        assert status.staple(sha) == revoked
        assert not await status.refresh(session)  # the replay: refused, logged
    assert status.staple(sha) == revoked
    assert (tmp_path / "ocsp" / f"{sha}.der").read_bytes() == revoked
    # and a server starting again from its folder holds the revoked one
    again = own_status(url, tmp_path)
    assert again.staple(sha) == revoked
