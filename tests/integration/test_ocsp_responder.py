"""The development OCSP responder (certs.ocsp_responder) checked by OpenSSL and by gateway.ocsp.

OpenSSL is the independent judge: `openssl ocsp` must verify what the responder signs,
from a file and live over HTTP, and see a `gateway pki revoke` without a restart.
"""

from __future__ import annotations

import base64
import json
import select
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote
from urllib.request import urlopen

import pytest
from aiohttp.test_utils import TestClient, TestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from certs.ocsp_responder import OcspResponder, load_revoked, ocsp_app, revoke
from certs.pki import init_pki
from gateway.identifiers import MemberId, SecurityServerId, SubsystemId
from gateway.ocsp import CertStatus, StatusInfo, build_request, check_response

GATEWAY = Path(sys.executable).parent / "gateway"
MEMBER, SERVER = "UY/GOV/1234", "UY/GOV/1234/ss1"
SUBJECT_FILE = "sign/UY_GOV_1234.crt"
LOCAL_CLIENT_FILE = "local/UY_GOV_1234_ss1/clients/UY_GOV_1234_app.crt"
needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


def make_pki(folder: Path, *members: str) -> Path:
    server = SecurityServerId.parse(SERVER)
    init_pki(
        folder,
        instance="UY",
        members=[MemberId.parse(m) for m in (MEMBER, *members)],
        servers=[server],
        registry_addresses=["127.0.0.1:1"],
        now=datetime.now(UTC),
        local_clients={server: [SubsystemId.parse(f"{MEMBER}/app")]},
    )
    return folder


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    return make_pki(tmp_path / "pki")


def cert(pki: Path, name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((pki / name).read_bytes())


def responder(pki: Path) -> OcspResponder:
    return OcspResponder(pki_dir=pki, clock=lambda: datetime.now(UTC))


def status_of(response_der: bytes, pki: Path, name: str = SUBJECT_FILE) -> StatusInfo:
    return check_response(
        response_der,
        certificate=cert(pki, name),
        issuer=cert(pki, "ca.crt"),
        at=datetime.now(UTC),
        freshness=timedelta(minutes=5),
    )


def openssl_files(pki: Path, folder: Path) -> None:
    """ca.pem and subject.pem (the member's signing certificate) in `folder`."""
    shutil.copy(pki / "ca.crt", folder / "ca.pem")
    shutil.copy(pki / SUBJECT_FILE, folder / "subject.pem")


def openssl_ocsp(*args: str, cwd: Path) -> str:
    """Run `openssl ocsp ARGS`; return stdout + stderr after asserting the response verified."""
    result = subprocess.run(
        ["openssl", "ocsp", *args], cwd=cwd, capture_output=True, text=True, timeout=30
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Response verify OK" in output, output
    return output


# ---- OpenSSL judges the responses -------------------------------------------------------


@needs_openssl
def test_openssl_verifies_good_then_revoked(pki: Path, tmp_path: Path) -> None:
    """openssl ocsp -respin: the responses verify, good first, revoked after revoke()."""
    openssl_files(pki, tmp_path)
    service = responder(pki)
    request = build_request(cert(pki, SUBJECT_FILE), cert(pki, "ca.crt"))
    command = ["-respin", "resp.der", "-issuer", "ca.pem", "-CAfile", "ca.pem"]
    command += ["-cert", "subject.pem", "-resp_text"]

    (tmp_path / "resp.der").write_bytes(service.respond(request))
    assert "subject.pem: good" in openssl_ocsp(*command, cwd=tmp_path)

    revoke(
        pki,
        cert(pki, SUBJECT_FILE),
        reason=x509.ReasonFlags.key_compromise,
        at=datetime.now(UTC),
    )
    (tmp_path / "resp.der").write_bytes(service.respond(request))
    output = openssl_ocsp(*command, cwd=tmp_path)
    assert "subject.pem: revoked" in output
    assert "Reason: keyCompromise" in output


# ---- the responder ----------------------------------------------------------------------


def test_good_and_revoked_pass_check_response(pki: Path) -> None:
    """The security servers' check accepts the responder's answers."""
    service = responder(pki)
    request = build_request(cert(pki, SUBJECT_FILE), cert(pki, "ca.crt"))
    assert status_of(service.respond(request), pki).status is CertStatus.GOOD
    when = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    revoke(pki, cert(pki, SUBJECT_FILE), reason=x509.ReasonFlags.superseded, at=when)
    info = status_of(service.respond(request), pki)
    assert (info.status, info.revoked_at, info.reason) == (CertStatus.REVOKED, when, "superseded")


def test_malformed_request(pki: Path) -> None:
    """Bytes that are no OCSPRequest get malformedRequest, not an exception."""
    service = responder(pki)
    for data in (b"", b"\x30\x00", b"not an OCSP request", b"\x30\x82\xff\xff"):
        answer = ocsp.load_der_ocsp_response(service.respond(data))
        assert answer.response_status is ocsp.OCSPResponseStatus.MALFORMED_REQUEST


def test_another_issuer_is_unauthorized(pki: Path) -> None:
    """A local client certificate is from a server's local CA: not this responder's."""
    request = build_request(cert(pki, LOCAL_CLIENT_FILE), cert(pki, "local/UY_GOV_1234_ss1/ca.crt"))
    answer = ocsp.load_der_ocsp_response(responder(pki).respond(request))
    assert answer.response_status is ocsp.OCSPResponseStatus.UNAUTHORIZED


def test_unknown_serial(pki: Path) -> None:
    """A serial this CA never issued (or one of local/, another CA's) is unknown."""
    ca = cert(pki, "ca.crt")
    own = ocsp.load_der_ocsp_request(build_request(ca, ca))
    service = responder(pki)
    for serial in (12345, cert(pki, LOCAL_CLIENT_FILE).serial_number):
        request = (
            ocsp.OCSPRequestBuilder()
            .add_certificate_by_hash(
                own.issuer_name_hash, own.issuer_key_hash, serial, hashes.SHA1()
            )
            .build()
            .public_bytes(serialization.Encoding.DER)
        )
        answer = ocsp.load_der_ocsp_response(service.respond(request))
        assert answer.certificate_status is ocsp.OCSPCertStatus.UNKNOWN
        assert answer.serial_number == serial


def test_sha256_certid_is_answered_in_kind(pki: Path) -> None:
    subject, ca = cert(pki, SUBJECT_FILE), cert(pki, "ca.crt")
    request = ocsp.OCSPRequestBuilder().add_certificate(subject, ca, hashes.SHA256()).build()
    response = responder(pki).respond(request.public_bytes(serialization.Encoding.DER))
    assert isinstance(ocsp.load_der_ocsp_response(response).hash_algorithm, hashes.SHA256)
    assert status_of(response, pki).status is CertStatus.GOOD


def test_new_certificate_is_found_by_a_rescan(pki: Path) -> None:
    """A certificate issued after start is answered good once the folder is rescanned."""
    service = responder(pki)
    make_pki(pki, "UY/GOV/5678")
    time.sleep(1.1)  # rescans happen at most once per second
    request = build_request(cert(pki, "sign/UY_GOV_5678.crt"), cert(pki, "ca.crt"))
    assert status_of(service.respond(request), pki, "sign/UY_GOV_5678.crt").status is (
        CertStatus.GOOD
    )


def test_revocation_register(pki: Path) -> None:
    """The first revocation is kept; another CA's certificate is refused."""
    subject = cert(pki, SUBJECT_FILE)
    first = datetime(2025, 1, 1, tzinfo=UTC)
    revoke(pki, subject, reason=x509.ReasonFlags.key_compromise, at=first)
    revoke(pki, subject, reason=x509.ReasonFlags.superseded, at=first + timedelta(days=1))
    assert load_revoked(pki) == {subject.serial_number: (first, x509.ReasonFlags.key_compromise)}
    entry = json.loads((pki / "revoked.json").read_text())[format(subject.serial_number, "x")]
    assert entry == {
        "revoked_at": "2025-01-01T00:00:00+00:00",
        "reason": "keyCompromise",
        "subject": MEMBER,
    }
    with pytest.raises(ValueError, match="not issued by the CA"):
        revoke(
            pki,
            cert(pki, LOCAL_CLIENT_FILE),
            reason=x509.ReasonFlags.unspecified,
            at=first,
        )
    assert not list(pki.glob(".revoked.json.*.tmp"))  # no temporary file left behind


# ---- HTTP (RFC 6960 Appendix A.1) -------------------------------------------------------


async def test_http_post_get_and_limits(pki: Path) -> None:
    request = build_request(cert(pki, SUBJECT_FILE), cert(pki, "ca.crt"))
    async with TestClient(TestServer(ocsp_app(responder(pki), max_request_bytes=1024))) as client:
        posted = await client.post(
            "/", data=request, headers={"Content-Type": "application/ocsp-request"}
        )
        assert posted.status == 200
        assert posted.content_type == "application/ocsp-response"
        assert status_of(await posted.read(), pki).status is CertStatus.GOOD

        encoded = quote(base64.b64encode(request).decode(), safe="")
        got = await client.get(f"/{encoded}")
        assert got.status == 200
        assert status_of(await got.read(), pki).status is CertStatus.GOOD

        bad = await client.get("/not-base64!")
        malformed = ocsp.load_der_ocsp_response(await bad.read())
        assert malformed.response_status is ocsp.OCSPResponseStatus.MALFORMED_REQUEST

        wrong_type = await client.post("/", data=request, headers={"Content-Type": "text/plain"})
        assert wrong_type.status == 415
        too_large = await client.post(
            "/", data=b"\x30" * 2048, headers={"Content-Type": "application/ocsp-request"}
        )
        assert too_large.status == 413
        health = await client.get("/healthz")
        assert (health.status, await health.text()) == (200, "ok")


# ---- the command line -------------------------------------------------------------------


def gateway(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(GATEWAY), *args], capture_output=True, text=True, timeout=60, check=False
    )


@needs_openssl
def test_serve_live_with_openssl_and_revoke_from_the_cli(pki: Path, tmp_path: Path) -> None:
    """`gateway pki serve --ocsp --tsa`: openssl asks over HTTP, `gateway pki revoke` takes
    effect without a restart, SIGTERM stops it."""
    openssl_files(pki, tmp_path)
    process = subprocess.Popen(
        [GATEWAY, "pki", "serve", "--dir", pki, "--ocsp", "127.0.0.1:0", "--tsa", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 30)
        assert ready, "no ready line within 30 s"
        urls = json.loads(process.stdout.readline())
        url = urls["ocsp"]
        assert url.startswith("http://127.0.0.1:")
        with urlopen(f"{urls['tsa']}healthz", timeout=10) as health:
            assert health.read() == b"ok"
        live = ["-issuer", "ca.pem", "-cert", "subject.pem", "-url", url, "-CAfile", "ca.pem"]

        assert "subject.pem: good" in openssl_ocsp(*live, cwd=tmp_path)

        subject = str(tmp_path / "subject.pem")
        revoked = gateway(
            "pki",
            "revoke",
            "--dir",
            str(pki),
            "--certificate",
            subject,
            "--reason",
            "keyCompromise",
        )
        assert revoked.returncode == 0, revoked.stderr
        assert f"revoked: CN={MEMBER}" in revoked.stdout
        output = openssl_ocsp(*live, cwd=tmp_path)
        assert "subject.pem: revoked" in output
        assert "Reason: keyCompromise" in output

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
        logs = process.stderr.read() if process.stderr else ""
        assert '"status": "revoked"' in logs
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_revoke_cli_errors(pki: Path) -> None:
    """Unknown file, unknown serial, bad reason, foreign certificate: exit 2 with a message."""
    cases = [
        (["--certificate", str(pki / "missing.crt")], "missing.crt"),
        (["--serial", "abc123"], "no certificate with serial abc123"),
        (["--serial", "xyz"], "not a hexadecimal number"),
        (["--serial", "abc", "--reason", "bogus"], "invalid choice: 'bogus'"),
        (["--certificate", str(pki / LOCAL_CLIENT_FILE)], "not issued by the CA"),
    ]
    for args, message in cases:
        result = gateway("pki", "revoke", "--dir", str(pki), *args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert message in result.stderr, (args, result.stderr)
    assert not (pki / "revoked.json").exists()
    serial = format(cert(pki, SUBJECT_FILE).serial_number, "X")
    result = gateway("pki", "revoke", "--dir", str(pki), "--serial", serial)
    assert result.returncode == 0, result.stderr
    assert "reason unspecified" in result.stdout
    again = gateway("pki", "revoke", "--dir", str(pki), "--serial", serial)
    assert "already revoked" in again.stdout


def test_serve_needs_a_service(pki: Path) -> None:
    result = gateway("pki", "serve", "--dir", str(pki))
    assert result.returncode == 2
    assert "--ocsp" in result.stderr
