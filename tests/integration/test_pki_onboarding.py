"""`gateway pki csr`, `sign` and `import` as an agency onboarding with an external CA uses
them: the key stays where it was made (0600, never overwritten), the CA signs the request,
and import installs the certificate where the settings expect it only when it checks out,
printing each problem otherwise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway_demo.runner import TEMPLATE

SERVER = "UY/GOV/MSP/ss9"


def gateway(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway_cli.main", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("onboarding") / "pki"
    done = gateway("pki", "init", "--dir", str(folder), "--topology", str(TEMPLATE))
    assert done.returncode == 0, done.stderr
    return folder


def test_a_new_server_gets_its_certificate_through_a_request(pki: Path, tmp_path: Path) -> None:
    agency = tmp_path / "agency"
    made = gateway("pki", "csr", "--server", SERVER, "--out", str(agency), "--host", "ss9.msp.uy")
    assert made.returncode == 0, made.stdout + made.stderr
    key, request = agency / "UY_GOV_MSP_ss9.key", agency / "UY_GOV_MSP_ss9.csr"
    assert key.stat().st_mode & 0o777 == 0o600
    again = gateway("pki", "csr", "--server", SERVER, "--out", str(agency))
    assert again.returncode == 1 and "never overwritten" in again.stdout
    signed = tmp_path / "ss9.crt"
    done = gateway("pki", "sign", "--dir", str(pki), "--csr", str(request), "--out", str(signed))
    assert done.returncode == 0, done.stdout + done.stderr
    imported = gateway(
        "pki",
        "import",
        "--server",
        SERVER,
        "--certificate",
        str(signed),
        "--key",
        str(key),
        "--ca",
        str(pki / "ca.crt"),
        "--dir",
        str(pki),
    )
    assert imported.returncode == 0, imported.stdout + imported.stderr
    assert (pki / "auth" / "UY_GOV_MSP_ss9.crt").read_bytes() == signed.read_bytes()
    assert (pki / "auth" / "UY_GOV_MSP_ss9.key").stat().st_mode & 0o777 == 0o600


def test_import_refuses_a_certificate_for_another_identity_or_key(
    pki: Path, tmp_path: Path
) -> None:
    """The member's signing certificate offered for a server, with another key: each
    problem is printed, nothing is installed."""
    agency = tmp_path / "agency"
    assert gateway("pki", "csr", "--member", "UY/GOV/MSP", "--out", str(agency)).returncode == 0
    signed = tmp_path / "member.crt"
    request = agency / "UY_GOV_MSP.csr"
    assert (
        gateway(
            "pki", "sign", "--dir", str(pki), "--csr", str(request), "--out", str(signed)
        ).returncode
        == 0
    )
    refused = gateway(
        "pki",
        "import",
        "--server",
        "UY/GOV/MSP/ss8",
        "--certificate",
        str(signed),
        "--key",
        str(pki / "auth" / "UY_GOV_MSP_ss1.key"),
        "--dir",
        str(pki),
    )
    assert refused.returncode == 1
    for problem in (
        "not the certificate of this key",
        "its common name is 'UY/GOV/MSP', not 'UY/GOV/MSP/ss8'",
        "lacks serverAuth",
        "lack the DNS name",
    ):
        assert problem in refused.stdout, refused.stdout
    assert not (pki / "auth" / "UY_GOV_MSP_ss8.crt").exists()


def test_the_development_ca_refuses_a_request_that_names_no_server_or_member(
    pki: Path, tmp_path: Path
) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "www.example.org")]))
        .sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
    )
    path = tmp_path / "odd.csr"
    path.write_bytes(request.public_bytes(serialization.Encoding.PEM))
    refused = gateway(
        "pki", "sign", "--dir", str(pki), "--csr", str(path), "--out", str(tmp_path / "x")
    )
    assert refused.returncode == 1 and "neither a security server id" in refused.stdout
