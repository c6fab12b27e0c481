"""TLS on the HTTP APIs (`gateway_ops.server.server_tls`): the registry's admin API and a
security server's auditor API serve HTTPS with the files their settings name."""

from __future__ import annotations

import asyncio
import http.client
import ssl
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aiohttp import web

from certs.pki import issue, write_pair
from gateway.errors import ConfigFileError
from gateway_ops.server import server_tls


def write(folder: Path, kind: str, issuer: object = None) -> tuple[Path, Path, object]:
    issued = issue(
        common_name=f"test {kind}",
        issuer=issuer,  # type: ignore[arg-type]
        now=datetime.now(UTC),
        days=1,
        kind=kind,
        hosts=("127.0.0.1",),
    )
    cert, key = write_pair(folder, kind, issued)
    return cert, key, issued


async def test_an_api_with_certificate_and_key_serves_https(tmp_path: Path) -> None:
    ca_cert, _, ca = write(tmp_path, "ca")
    cert, key, _ = write(tmp_path, "local-server", ca)
    context = server_tls(cert, key, "api")
    assert context is not None and context.minimum_version == ssl.TLSVersion.TLSv1_2

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context).start()
    port = runner.addresses[0][1]

    def get() -> int:
        client = ssl.create_default_context(cafile=str(ca_cert))
        connection = http.client.HTTPSConnection("127.0.0.1", port, context=client, timeout=5)
        try:
            connection.request("GET", "/healthz")
            return connection.getresponse().status
        finally:
            connection.close()

    try:
        assert await asyncio.to_thread(get) == 200
    finally:
        await runner.cleanup()


def test_plain_http_without_files_and_clear_errors_otherwise(tmp_path: Path) -> None:
    assert server_tls(None, None, "api") is None
    with pytest.raises(ConfigFileError, match=r"api\.tls_certificate and api\.tls_key go together"):
        server_tls(tmp_path / "a.crt", None, "api")
    with pytest.raises(ConfigFileError, match=r"auditor\.tls_certificate, auditor\.tls_key"):
        server_tls(tmp_path / "missing.crt", tmp_path / "missing.key", "auditor")
