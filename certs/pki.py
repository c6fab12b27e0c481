"""Development PKI: `gateway pki init`.

Layout of the folder it writes (keys are 0600; the folder is meant to be git-ignored):

    ca.crt, ca.key                          instance CA (ECDSA P-256)
    configuration-signing.crt/.key          the registry's configuration-signing certificate
    tsa.crt/.key                            the development time-stamping authority (RFC 3161)
    ocsp.crt/.key                           the development OCSP responder (RFC 6960)
    anchor.json                             the instance anchor security servers install
    auth/<SERVER>.crt/.key                  TLS certificate per security server
    sign/<MEMBER>.crt/.key                  signing certificate per member
    local/<SERVER>/ca.crt                   the agency-internal CA of a server's consumer endpoint
    local/<SERVER>/consumer.crt/.key        the consumer endpoint's TLS certificate
    local/<SERVER>/clients/<SUBSYSTEM>.crt  a local client's certificate (CN = subsystem id)

where <SERVER> and <MEMBER> are identifiers with '/' replaced by '_'.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.certificate_profile import AUTH, SIGN, Profile, check_request, general_names, subject
from gateway.configuration import Anchor
from gateway.identifiers import MemberId, SecurityServerId, SubsystemId


def slug(identifier: object) -> str:
    """A file name for an identifier."""
    return str(identifier).replace("/", "_")


@dataclass(frozen=True, slots=True, kw_only=True)
class Issued:
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate


def _name(common_name: str, organisation: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def issue(
    *,
    common_name: str,
    issuer: Issued | None,
    now: datetime,
    days: int,
    kind: str,
    organisation: str = "Interoperability gateway (development)",
    hosts: tuple[str, ...] = (),
) -> Issued:
    """Issue a certificate of `kind` signed by `issuer`.

    Kinds: 'ca'; 'auth' (a security server's TLS certificate); 'sign' (a member's signing
    certificate); 'config' (the registry's configuration signing); 'local-server' and
    'local-client' (TLS between an agency's backends and its own security server); 'tsa'
    (a time-stamping authority: critical timeStamping extended key usage, RFC 3161 2.3);
    'ocsp' (a delegated OCSP responder: OCSPSigning extended key usage and id-pkix-ocsp-nocheck,
    RFC 6960 4.2.2.2).

    With `issuer=None` the certificate is self-signed (a root CA). 'auth' and 'sign'
    certificates follow the profiles an external CA's must meet
    (`gateway.certificate_profile`); `hosts` are then a server's extra host names.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    if kind in (AUTH, SIGN):
        assert issuer is not None, "a server's or member's certificate needs a CA"
        profile = Profile(kind, common_name, hosts)
        certificate = certify(
            key.public_key(), subject(profile, organisation), profile, issuer, now=now, days=days
        )
        return Issued(key=key, certificate=certificate)
    subject_name = _name(common_name, organisation)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject_name)
        .issuer_name(issuer.certificate.subject if issuer else subject_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
    usage = dict.fromkeys(
        (
            "digital_signature",
            "content_commitment",
            "key_encipherment",
            "data_encipherment",
            "key_agreement",
            "key_cert_sign",
            "crl_sign",
            "encipher_only",
            "decipher_only",
        ),
        False,
    )
    if kind == "ca":
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=0), critical=True
        )
        usage.update(key_cert_sign=True, crl_sign=True, digital_signature=True)
    else:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=False, path_length=None), critical=True
        )
    if kind == "config":
        usage.update(digital_signature=True, content_commitment=True)
    if kind in ("local-server", "local-client"):
        usage.update(digital_signature=True)
        purpose = (
            ExtendedKeyUsageOID.SERVER_AUTH
            if kind == "local-server"
            else ExtendedKeyUsageOID.CLIENT_AUTH
        )
        builder = builder.add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
        if kind == "local-server":
            builder = builder.add_extension(
                x509.SubjectAlternativeName(general_names(hosts)), critical=False
            )
    if kind == "tsa":
        usage.update(digital_signature=True, content_commitment=True)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.TIME_STAMPING]), critical=True
        )
    if kind == "ocsp":
        usage.update(digital_signature=True)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), critical=False
        ).add_extension(x509.OCSPNoCheck(), critical=False)
    builder = builder.add_extension(x509.KeyUsage(**usage), critical=True)
    signing_key = issuer.key if issuer else key
    return Issued(key=key, certificate=builder.sign(signing_key, hashes.SHA256()))


# the longest validity `gateway pki sign` gives (ten years)
MAX_DAYS = 3650


def certify(
    public_key: ec.EllipticCurvePublicKey,
    subject_name: x509.Name,
    profile: Profile,
    issuer: Issued,
    *,
    now: datetime,
    days: int,
) -> x509.Certificate:
    """A certificate of `profile` for `public_key`, issued by `issuer`: the extensions are
    the profile's, never a request's (a CA decides what it certifies)."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject_name)
        .issuer_name(issuer.certificate.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
    )
    for extension, critical in profile.extensions():
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(issuer.key, hashes.SHA256())


def sign_request(
    ca: Issued, request: x509.CertificateSigningRequest, *, now: datetime, days: int
) -> x509.Certificate:
    """The development CA's answer to a request (`gateway pki sign`): checked against the
    profile its common name asks for, `ValueError` listing every problem otherwise. The
    CA decides what it certifies: the profile's extensions and a subject of the
    request's organisation and common name only; the extra host names a request asks for
    are checked (never another server's verified name, a wildcard or a network)."""
    if not 1 <= days <= MAX_DAYS:
        raise ValueError(f"a validity of {days} days is outside 1 to {MAX_DAYS}")
    names = request.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise ValueError("the request must name exactly one common name")
    organisations = request.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    if len(organisations) > 1:
        raise ValueError("the request must name at most one organisation")
    others = {a.oid for a in request.subject} - {NameOID.COMMON_NAME, NameOID.ORGANIZATION_NAME}
    if others:
        shown = ", ".join(a.rfc4514_string() for a in request.subject if a.oid in others)
        raise ValueError(f"the request's subject names more than an organisation: {shown}")
    profile = Profile.named(str(names[0].value))
    problems = check_request(profile, request)
    if problems:
        raise ValueError("; ".join(problems))
    hosts: tuple[str, ...] = ()
    try:
        alternative = request.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        hosts = tuple(str(n) for n in alternative.value.get_values_for_type(x509.DNSName)) + tuple(
            str(n) for n in alternative.value.get_values_for_type(x509.IPAddress)
        )
    except x509.ExtensionNotFound:
        pass
    profile = Profile(
        profile.kind, profile.identity, tuple(h for h in hosts if h not in profile.dns_names)
    )
    public_key = request.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)  # checked above
    organisation = str(organisations[0].value) if organisations else ""
    return certify(public_key, subject(profile, organisation), profile, ca, now=now, days=days)


def write_pair(folder: Path, stem: str, issued: Issued) -> tuple[Path, Path]:
    """Write `stem.crt` and `stem.key` (mode 0600) atomically into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    crt, key = folder / f"{stem}.crt", folder / f"{stem}.key"
    write_atomically(crt, issued.certificate.public_bytes(serialization.Encoding.PEM), 0o644)
    write_atomically(
        key,
        issued.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        0o600,
    )
    return crt, key


def write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Write `data` to `path` with `mode`: into a new file beside it, created exclusively
    (so never through a link, nor into a file someone left there with another mode), then
    renamed over `path` (which replaces a link at `path` instead of writing through it)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def load_issued(folder: Path, stem: str) -> Issued:
    key = serialization.load_pem_private_key((folder / f"{stem}.key").read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{folder / stem}.key is not an EC key")
    cert = x509.load_pem_x509_certificate((folder / f"{stem}.crt").read_bytes())
    return Issued(key=key, certificate=cert)


def ensure_pair(folder: Path, stem: str, make: Callable[[], Issued]) -> Issued:
    """The key pair `stem` in `folder`, issued by `make` and written only if it is missing.

    Re-running keeps what exists, so certificates already installed stay valid.
    """
    if (folder / f"{stem}.crt").exists():
        return load_issued(folder, stem)
    issued = make()
    write_pair(folder, stem, issued)
    return issued


def init_pki(
    folder: Path,
    *,
    instance: str,
    members: list[MemberId],
    servers: list[SecurityServerId],
    registry_addresses: list[str],
    now: datetime,
    days: int = 365,
    hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
    local_clients: dict[SecurityServerId, list[SubsystemId]] | None = None,
) -> Anchor:
    """Create (or complete) a development PKI in `folder`; return the instance anchor.

    What exists is kept: keys, certificates and the anchor (a second run adds only the
    missing certificates, and never rewrites `anchor.json` with other addresses)."""
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)

    def make(
        common_name: str, kind: str, issuer: Issued | None, **extra: Any
    ) -> Callable[[], Issued]:
        lifetime = days * 2 if kind == "ca" else days
        return lambda: issue(
            common_name=common_name, issuer=issuer, now=now, days=lifetime, kind=kind, **extra
        )

    ca = ensure_pair(folder, "ca", make(f"{instance} development CA", "ca", None))
    config = ensure_pair(
        folder, "configuration-signing", make(f"{instance} configuration signing", "config", ca)
    )
    ensure_pair(folder, "tsa", make(f"{instance} development time-stamping", "tsa", ca))
    ensure_pair(folder, "ocsp", make(f"{instance} development OCSP responder", "ocsp", ca))
    for member in members:
        ensure_pair(folder / "sign", slug(member), make(str(member), "sign", ca))
    for server in servers:
        ensure_pair(folder / "auth", slug(server), make(str(server), "auth", ca, hosts=hosts))
    for server, subsystems in (local_clients or {}).items():
        # TLS between an agency's backends and its own server's consumer endpoint: an
        # agency-internal CA, the endpoint's certificate, a client certificate per subsystem
        local = folder / "local" / slug(server)
        local_ca = ensure_pair(local, "ca", make(f"local CA of {server}", "ca", None))
        ensure_pair(
            local, "consumer", make("consumer endpoint", "local-server", local_ca, hosts=hosts)
        )
        for subsystem in subsystems:
            ensure_pair(
                local / "clients", slug(subsystem), make(str(subsystem), "local-client", local_ca)
            )
    existing = folder / "anchor.json"
    if existing.exists():
        # a running instance's anchor (its registry addresses, maybe set by hand) is never
        # rewritten: re-running only adds the certificates that are missing
        return Anchor.from_json(json.loads(existing.read_text()))
    anchor = Anchor(
        instance=instance,
        signing_certificates=(config.certificate.public_bytes(serialization.Encoding.DER),),
        addresses=tuple(registry_addresses),
    )
    write_atomically(existing, json.dumps(anchor.to_json(), indent=2).encode(), 0o644)
    return anchor
