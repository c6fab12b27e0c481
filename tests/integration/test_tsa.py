"""The development TSA over HTTP (RFC 3161 3.4): aiohttp's test server on 127.0.0.1.

A real POST of a TimeStampReq is answered with a token that verifies; the endpoint refuses
other content types (415) and bodies over its limit (413), and logs every answer.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from structlog.testing import capture_logs

from certs.pki import Issued, issue
from certs.tsa import TimeStampAuthority, tsa_app
from gateway.tsp import build_request, token_from_response, verify_token

NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
DIGEST = hashlib.sha256(b"a record of the message log").digest()
QUERY = {"Content-Type": "application/timestamp-query"}

Client = TestClient[web.Request, web.Application]


@pytest.fixture
def ca() -> Issued:
    return issue(common_name="UY test CA", issuer=None, now=NOW, days=3650, kind="ca")


@pytest.fixture
async def client(ca: Issued) -> AsyncIterator[Client]:
    tsa = issue(common_name="UY TSA", issuer=ca, now=NOW, days=365, kind="tsa")
    authority = TimeStampAuthority(key=tsa.key, certificate=tsa.certificate, clock=lambda: NOW)
    server = TestServer(tsa_app(authority, max_request_bytes=1024), host="127.0.0.1")
    async with TestClient(server) as client:
        yield client


async def test_post_a_request(client: Client, ca: Issued) -> None:
    with capture_logs() as logs:
        response = await client.post("/", data=build_request(DIGEST, 7), headers=QUERY)
        body = await response.read()
    assert response.status == 200
    assert response.content_type == "application/timestamp-reply"
    token = token_from_response(body, digest=DIGEST, nonce=7)
    info = verify_token(token, digest=DIGEST, cas=[ca.certificate])
    assert info.gen_time == NOW
    assert logs[-1]["outcome"] == "granted"
    assert logs[-1]["serial"] == f"{info.serial:#x}"


async def test_a_bad_request_is_answered_with_a_rejection(
    client: Client,
) -> None:
    with capture_logs() as logs:
        response = await client.post("/", data=b"not a request", headers=QUERY)
    assert response.status == 200
    assert response.content_type == "application/timestamp-reply"
    assert logs[-1]["outcome"] == "bad_data_format"
    assert logs[-1]["serial"] is None


async def test_wrong_content_type(client: Client) -> None:
    response = await client.post(
        "/", data=build_request(DIGEST, 7), headers={"Content-Type": "application/octet-stream"}
    )
    assert response.status == 415


async def test_oversized_request(client: Client) -> None:
    response = await client.post("/", data=b"\x30" * 2048, headers=QUERY)
    assert response.status == 413


async def test_only_post(client: Client) -> None:
    assert (await client.get("/")).status == 405


async def test_healthz(client: Client) -> None:
    response = await client.get("/healthz")
    assert response.status == 200
    assert await response.text() == "ok"
