"""The registry's admin API over HTTPS (`api.tls_certificate`, `api.tls_key`): a real
registry process serves it; a client trusting the instance's CA gets answers; a client
speaking plain HTTP, or one that does not trust the certificate, gets none."""

from __future__ import annotations

import http.client
import ssl
import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import tomli_w

from certs.pki import issue, load_issued, write_pair
from gateway_demo.runner import Runner


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Runner, str]]:
    runner = Runner(tmp_path_factory.mktemp("registry-tls") / "run")
    try:
        runner.prepare()
        api_tls = issue(
            common_name="registry admin API",
            issuer=load_issued(runner.pki, "ca"),
            now=datetime.now(UTC),
            days=1,
            kind="local-server",
            hosts=("127.0.0.1",),
        )
        certificate, key = write_pair(runner.workdir / "api-tls", "api", api_tls)
        path = runner.workdir / "registry.toml"
        settings = tomllib.loads(path.read_text())
        settings["api"] |= {"tls_certificate": str(certificate), "tls_key": str(key)}
        path.write_text(tomli_w.dumps(settings))
        ready = runner.start("registry")
        yield runner, str(ready["api"])
    finally:
        runner.close()


def _status(address: str, context: ssl.SSLContext | None) -> int:
    host, port = address.rsplit(":", 1)
    connection: http.client.HTTPConnection = (
        http.client.HTTPSConnection(host, int(port), context=context, timeout=5)
        if context is not None
        else http.client.HTTPConnection(host, int(port), timeout=5)
    )
    try:
        connection.request("GET", "/healthz")
        return connection.getresponse().status
    finally:
        connection.close()


def test_the_admin_api_answers_over_https_to_a_client_trusting_the_ca(
    registry: tuple[Runner, str],
) -> None:
    runner, url = registry
    assert url.startswith("https://")
    trusting = ssl.create_default_context(cafile=str(runner.pki / "ca.crt"))
    assert _status(url.removeprefix("https://"), trusting) == 200


def test_plain_http_and_an_untrusting_client_get_no_answer(registry: tuple[Runner, str]) -> None:
    _, url = registry
    address = url.removeprefix("https://")
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        _status(address, None)
    with pytest.raises(ssl.SSLCertVerificationError):
        _status(address, ssl.create_default_context())
