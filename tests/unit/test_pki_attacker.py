"""Red-team tests of `gateway pki csr`, `sign` and `import`: what a requester, a hostile
file or a planted path can make them do. Each test states what must hold."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from certs.pki import Issued, certify, init_pki, issue, sign_request
from gateway.certificate_profile import Profile, check_certificate, make_request, subject
from gateway.identifiers import MemberId, SecurityServerId, server_dns_name

NOW = datetime.now(UTC)
SERVER = SecurityServerId.parse("UY/GOV/EVIL/ss1")
VICTIM = SecurityServerId.parse("UY/GOV/DNIC/ss1")
MEMBER = MemberId.parse("UY/GOV/NEW")


def gateway(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway_cli.main", *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def ca() -> Issued:
    return issue(common_name="UY development CA", issuer=None, now=NOW, days=3650, kind="ca")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("rt") / "pki"
    init_pki(folder, instance="UY", members=[], servers=[], registry_addresses=[], now=NOW)
    return folder


def pem_request(request: x509.CertificateSigningRequest, path: Path) -> Path:
    path.write_bytes(request.public_bytes(serialization.Encoding.PEM))
    return path


# ---- sign: what a requester can ask for ------------------------------------------------


@pytest.mark.parametrize(
    "extra", [server_dns_name(VICTIM), "*.server.gateway.invalid"], ids=["other", "wildcard"]
)
def test_the_ca_never_certifies_another_servers_tls_name(ca: Issued, extra: str) -> None:
    """A request for server EVIL's TLS certificate must not obtain a certificate valid for
    DNIC's name (consumers verify a provider only by that name and the CA)."""
    request = make_request(Profile.server(SERVER, [extra]), key(), "")
    with pytest.raises(ValueError, match=r"another security server's verified name|wildcard"):
        sign_request(ca, request, now=NOW, days=365)


def test_the_ca_certifies_no_subject_attribute_it_did_not_decide(ca: Issued) -> None:
    """A subject naming another agency besides the requester's common name (OU,
    serialNumber) is refused, not copied into what the CA issues."""
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, str(VICTIM.owner)),
                    x509.NameAttribute(NameOID.SERIAL_NUMBER, "DNIC"),
                    x509.NameAttribute(NameOID.COMMON_NAME, str(MEMBER)),
                ]
            )
        )
        .add_extension(Profile.member(MEMBER).key_usage(), critical=True)
        .sign(key(), hashes.SHA256())
    )
    with pytest.raises(ValueError, match="subject names more than an organisation: OU=UY/GOV/DNIC"):
        sign_request(ca, request, now=NOW, days=365)
    # what `pki csr` asks for (organisation and common name) is certified as asked
    plain = make_request(Profile.member(MEMBER), key(), "Agencia Nueva")
    issued = sign_request(ca, plain, now=NOW, days=365)
    assert issued.subject == plain.subject


# ---- sign and import: hostile files give an error, never a traceback ----------------------


def _malformed_requests(tmp_path: Path) -> dict[str, Path]:
    profile = Profile.member(MEMBER)
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(MEMBER))])
    )
    for extension, critical in profile.extensions():
        builder = builder.add_extension(extension, critical=critical)
    plain = builder.sign(key(), hashes.SHA256()).public_bytes(serialization.Encoding.DER)
    odd = builder.add_extension(
        x509.UnrecognizedExtension(x509.ObjectIdentifier("2.5.29.99"), b"\x03\x02\x01\x00"),
        critical=False,
    )
    der = odd.sign(key(), hashes.SHA256()).public_bytes(serialization.Encoding.DER)
    files = {
        # a second keyUsage extension (2.5.29.99 patched to 2.5.29.15)
        "duplicate-extension": der.replace(
            bytes.fromhex("0603551d63"), bytes.fromhex("0603551d0f")
        ),
        # a key on a curve nobody supports (prime256v1 patched to 1.2.840.10045.3.1.9)
        "unknown-curve": plain.replace(
            bytes.fromhex("06082A8648CE3D030107"), bytes.fromhex("06082A8648CE3D030109")
        ),
    }
    out = {}
    for name, data in files.items():
        out[name] = pem_request(x509.load_der_x509_csr(data), tmp_path / f"{name}.csr")
    return out


@pytest.mark.parametrize("case", ["duplicate-extension", "unknown-curve"])
def test_sign_refuses_a_malformed_request_without_a_traceback(
    pki: Path, tmp_path: Path, case: str
) -> None:
    request = _malformed_requests(tmp_path)[case]
    done = gateway("pki", "sign", "--dir", pki, "--csr", request, "--out", tmp_path / "x.crt")
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode != 0 and "pki sign" in done.stdout


def test_sign_refuses_an_absurd_validity_without_a_traceback(pki: Path, tmp_path: Path) -> None:
    request = pem_request(make_request(Profile.member(MEMBER), key(), ""), tmp_path / "m.csr")
    done = gateway(
        "pki", "sign", "--dir", pki, "--csr", request, "--out", tmp_path / "m.crt",
        "--days", "99999999",
    )  # fmt: skip
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode != 0


def _member_files(pki: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A member key made by `pki csr` and its certificate from `pki sign`."""
    agency = tmp_path / "agency"
    assert gateway("pki", "csr", "--member", MEMBER, "--out", agency).returncode == 0
    crt = tmp_path / "member.crt"
    done = gateway("pki", "sign", "--dir", pki, "--csr", agency / "UY_GOV_NEW.csr", "--out", crt)
    assert done.returncode == 0, done.stdout + done.stderr
    return agency / "UY_GOV_NEW.key", crt


def test_import_refuses_an_encrypted_key_without_a_traceback(pki: Path, tmp_path: Path) -> None:
    own, crt = _member_files(pki, tmp_path)
    loaded = serialization.load_pem_private_key(own.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        loaded.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    done = gateway(
        "pki", "import", "--member", MEMBER, "--certificate", crt, "--key", encrypted,
        "--ca", pki / "ca.crt", "--dir", tmp_path / "installed",
    )  # fmt: skip
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode != 0 and "pki import" in done.stdout


# ---- files: keys stay 0600 and are written only where they belong --------------------------


def test_import_never_writes_the_key_through_a_planted_symlink(pki: Path, tmp_path: Path) -> None:
    own, crt = _member_files(pki, tmp_path)
    target = tmp_path / "elsewhere"
    target.write_text("someone else's file\n")
    (tmp_path / "installed" / "sign").mkdir(parents=True)
    (tmp_path / "installed" / "sign" / "UY_GOV_NEW.key").symlink_to(target)
    done = gateway(
        "pki", "import", "--member", MEMBER, "--certificate", crt, "--key", own,
        "--ca", pki / "ca.crt", "--dir", tmp_path / "installed",
    )  # fmt: skip
    assert done.returncode == 1 and "is a link" in done.stdout, done.stdout + done.stderr
    assert target.read_text() == "someone else's file\n", "the private key went through the link"


def test_import_without_replace_never_overwrites_an_existing_key(pki: Path, tmp_path: Path) -> None:
    own, crt = _member_files(pki, tmp_path)
    installed = tmp_path / "installed" / "sign" / "UY_GOV_NEW.key"
    installed.parent.mkdir(parents=True)
    installed.write_text("the key in use\n")
    done = gateway(
        "pki", "import", "--member", MEMBER, "--certificate", crt, "--key", own,
        "--ca", pki / "ca.crt", "--dir", tmp_path / "installed",
    )  # fmt: skip
    assert done.returncode == 1 and "holds another key" in done.stdout, done.stdout
    assert installed.read_text() == "the key in use\n"


def test_import_installs_only_the_certificate_it_checked(pki: Path, tmp_path: Path) -> None:
    own, crt = _member_files(pki, tmp_path)
    padded = tmp_path / "padded.crt"
    padded.write_bytes(crt.read_bytes() + b"garbage\n" + own.read_bytes())
    done = gateway(
        "pki", "import", "--member", MEMBER, "--certificate", padded, "--key", own,
        "--ca", pki / "ca.crt", "--dir", tmp_path / "installed",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    installed = (tmp_path / "installed" / "sign" / "UY_GOV_NEW.crt").read_bytes()
    assert installed == crt.read_bytes(), "installed bytes that were never checked"


@pytest.mark.parametrize("planted", ["file-0644", "symlink"])
def test_csr_key_is_owner_only_whatever_was_left_in_the_folder(
    tmp_path: Path, planted: str
) -> None:
    out = tmp_path / "requests"
    out.mkdir()
    tmp = out / "UY_GOV_NEW.key.tmp"
    loot = tmp_path / "loot"
    if planted == "symlink":
        loot.touch(mode=0o666)
        loot.chmod(0o666)
        tmp.symlink_to(loot)
    else:
        tmp.touch()
        tmp.chmod(0o644)
    done = gateway("pki", "csr", "--member", MEMBER, "--out", out)
    assert done.returncode == 0, done.stdout + done.stderr
    key_path = out / "UY_GOV_NEW.key"
    assert not key_path.is_symlink(), "the key is a link to a file others can read"
    assert key_path.stat().st_mode & 0o777 == 0o600
    assert not loot.exists() or b"PRIVATE KEY" not in loot.read_bytes()


def test_csr_files_of_two_servers_never_share_a_name(tmp_path: Path) -> None:
    """Server codes may contain '.': two servers must get two keys."""
    out = tmp_path / "requests"
    first = gateway("pki", "csr", "--server", "UY/GOV/MIDES/ss1.mides.uy", "--out", out)
    second = gateway("pki", "csr", "--server", "UY/GOV/MIDES/ss1.mides.ee", "--out", out)
    assert first.returncode == 0 and second.returncode == 0, second.stdout
    assert len(list(out.glob("*.key"))) == 2


@pytest.mark.parametrize("mistake", ["no-ca-folder", "no-out-folder"])
def test_sign_reports_a_wrong_path_without_a_traceback_or_registering(
    pki: Path, tmp_path: Path, mistake: str
) -> None:
    request = pem_request(make_request(Profile.member(MEMBER), key(), ""), tmp_path / "m.csr")
    before = set((pki / "issued").glob("*")) if (pki / "issued").exists() else set()
    folder = tmp_path / "missing" if mistake == "no-ca-folder" else pki
    out = tmp_path / "missing" / "m.crt"
    done = gateway("pki", "sign", "--dir", folder, "--csr", request, "--out", out)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode != 0
    # nothing the OCSP responder would answer "good" for, when nobody got the certificate
    assert set((pki / "issued").glob("*")) == before


def test_csr_refuses_extra_hosts_a_ca_would_refuse(tmp_path: Path) -> None:
    """`pki csr --host` with a wildcard, a network or another server's verified name: refused
    before any key is made."""
    for host in ("*.mides.uy", "10.0.0.0/8", server_dns_name(VICTIM), "bücher.uy", "999.1.1.1"):
        done = gateway("pki", "csr", "--server", SERVER, "--host", host, "--out", tmp_path)
        assert done.returncode == 1 and "pki csr: refused" in done.stdout, (host, done.stdout)
    assert not list(tmp_path.glob("*.key"))
    fine = gateway("pki", "csr", "--server", SERVER, "--host", "ss1.evil.uy", "--out", tmp_path)
    assert fine.returncode == 0, fine.stdout + fine.stderr


def test_a_certificate_naming_another_server_is_refused_wherever_it_is_checked(ca: Issued) -> None:
    """What `pki import` and the registry check (check_certificate): a server's TLS
    certificate from another CA that also names another server's verified name."""
    own = key()
    certificate = certify(
        own.public_key(),
        subject(Profile.server(SERVER), ""),
        Profile.server(SERVER, [server_dns_name(VICTIM), "*.server.gateway.invalid"]),
        ca,
        now=NOW,
        days=30,
    )
    problems = check_certificate(Profile.server(SERVER), certificate, own, now=NOW)
    assert any("another security server's verified name" in p for p in problems), problems
    assert any("wildcard" in p for p in problems), problems


def test_a_server_certificate_naming_a_uri_or_an_address_range_is_refused(ca: Issued) -> None:
    """Only host names and addresses: a URI or e-mail address among a server certificate's
    names (which TLS clients of other kinds may match) is refused by check_certificate."""
    own = key()
    profile = Profile.server(SERVER)
    names = [
        x509.DNSName(server_dns_name(SERVER)),
        x509.UniformResourceIdentifier("spiffe://uy/gov/dnic/ss1"),
        x509.RFC822Name("ops@dnic.gub.uy"),
    ]
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject(profile, ""))
        .issuer_name(ca.certificate.subject)
        .public_key(own.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW)
        .not_valid_after(NOW + timedelta(days=30))
    )
    for extension, critical in profile.extensions():
        if not isinstance(extension, x509.SubjectAlternativeName):
            builder = builder.add_extension(extension, critical=critical)
    certificate = builder.add_extension(x509.SubjectAlternativeName(names), critical=False).sign(
        ca.key, hashes.SHA256()
    )
    problems = " ".join(check_certificate(profile, certificate, own, now=NOW))
    assert "UniformResourceIdentifier" in problems and "RFC822Name" in problems, problems
