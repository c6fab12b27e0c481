"""What the gateway requires of the certificates an agency gets from a CA, and the PKCS#10
requests that ask for exactly that.

An agency onboarding with a national CA makes a key and a request (`gateway pki csr`),
sends the request to the CA, and installs what comes back only after `gateway pki import`
checked it against its key and these profiles, so that a certificate the servers would
refuse later (a name peers do not expect, a missing key usage) is refused at once, each
problem with its own message. The development CA signs requests through the same profiles
(`gateway pki sign`).

- **auth**, a security server's TLS certificate: the subject's common name is the server
  id; a DNS name `server_dns_name(server)` (the name peers verify) among its subject
  alternative names, with any extra host names (each a host name or an address: never a
  wildcard, a network, or another name under `SERVER_NAME_DOMAIN`, which peers would
  take for another server); extended key usages serverAuth and
  clientAuth (it serves and calls); key usage digitalSignature; not a CA.
- **sign**, a member's signing certificate: the common name is the member id; key usages
  digitalSignature and nonRepudiation (`content_commitment`), which is what makes it a
  signing certificate (a TLS certificate cannot sign messages); not a CA.

Both have an ECDSA P-256 key, as every signature and TLS key of the gateway.

Building blocks only: no files, no clock (`now` is passed in).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.errors import IdentifierError
from gateway.identifiers import SERVER_NAME_DOMAIN, MemberId, SecurityServerId, server_dns_name

AUTH = "auth"
SIGN = "sign"


@dataclass(frozen=True, slots=True)
class Profile:
    """The certificate one server (`auth`) or member (`sign`) needs."""

    kind: str
    identity: str
    # extra host names or addresses of a server's TLS certificate (auth only)
    hosts: tuple[str, ...] = ()

    @classmethod
    def server(cls, server: SecurityServerId, hosts: Sequence[str] = ()) -> Profile:
        return cls(AUTH, str(server), tuple(hosts))

    @classmethod
    def member(cls, member: MemberId) -> Profile:
        return cls(SIGN, str(member))

    @classmethod
    def named(cls, common_name: str, hosts: Sequence[str] = ()) -> Profile:
        """The profile a common name asks for: a server id (four parts) or a member id
        (three); `ValueError` for anything else."""
        try:
            return cls.server(SecurityServerId.parse(common_name), hosts)
        except IdentifierError:
            pass
        try:
            return cls.member(MemberId.parse(common_name))
        except IdentifierError:
            raise ValueError(
                f"the common name {common_name!r} is neither a security server id "
                "(INSTANCE/CLASS/MEMBER/SERVER) nor a member id (INSTANCE/CLASS/MEMBER)"
            ) from None

    @property
    def dns_names(self) -> tuple[str, ...]:
        """The DNS names a server's certificate carries: the one peers verify first."""
        if self.kind != AUTH:
            return ()
        try:
            server = SecurityServerId.parse(self.identity)
        except IdentifierError:  # not a server id: `check_*` say so
            return self.hosts
        return (server_dns_name(server), *self.hosts)

    def key_usage(self) -> x509.KeyUsage:
        return x509.KeyUsage(
            digital_signature=True,
            content_commitment=self.kind == SIGN,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=False,
            crl_sign=False,
            encipher_only=False,
            decipher_only=False,
        )

    def extensions(self) -> list[tuple[x509.ExtensionType, bool]]:
        """The extensions a certificate of this profile carries, with their criticality."""
        listed: list[tuple[x509.ExtensionType, bool]] = [
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (self.key_usage(), True),
        ]
        if self.kind == AUTH:
            listed.append(
                (
                    x509.ExtendedKeyUsage(
                        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                    ),
                    False,
                )
            )
            listed.append((x509.SubjectAlternativeName(general_names(self.dns_names)), False))
        return listed


def general_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """Subject alternative names: an IP address where the host is one, else a DNS name."""
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def subject(profile: Profile, organisation: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
            x509.NameAttribute(NameOID.COMMON_NAME, profile.identity),
        ]
    )


def check_hosts(profile: Profile) -> list[str]:
    """What is wrong with the extra host names or addresses asked for `profile` (empty:
    nothing): what a CA refuses to put in a server's TLS certificate."""
    if profile.kind != AUTH or not profile.dns_names:
        return []
    own = profile.dns_names[0]
    problems = []
    for host in profile.hosts:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            problem = _host_problem(host, own)
            if problem:
                problems.append(f"--host {problem}")
    return problems


def make_request(
    profile: Profile, key: ec.EllipticCurvePrivateKey, organisation: str
) -> x509.CertificateSigningRequest:
    """A PKCS#10 request for `profile`, signed with `key`."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject(profile, organisation))
    for extension, critical in profile.extensions():
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(key, hashes.SHA256())


def _common_names(name: x509.Name) -> list[str]:
    return [str(a.value) for a in name.get_attributes_for_oid(NameOID.COMMON_NAME)]


def _key_problems(public_key: object) -> list[str]:
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        return ["its key is not an ECDSA key (the gateway signs and does TLS with P-256)"]
    if not isinstance(public_key.curve, ec.SECP256R1):
        return [f"its key is on curve {public_key.curve.name}, not P-256 (secp256r1)"]
    return []


def _name_problems(profile: Profile, name: x509.Name) -> list[str]:
    names = _common_names(name)
    if names != [profile.identity]:
        shown = ", ".join(repr(n) for n in names) or "none"
        return [f"its common name is {shown}, not {profile.identity!r}"]
    return []


def _extension_problems(profile: Profile, extensions: x509.Extensions) -> list[str]:
    problems = []
    try:
        usage = extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        problems.append("it has no key usage extension")
    else:
        if not usage.digital_signature:
            problems.append("its key usage lacks digitalSignature")
        if profile.kind == SIGN and not usage.content_commitment:
            problems.append(
                "its key usage lacks nonRepudiation (contentCommitment): it would not be "
                "accepted as a signing certificate"
            )
        if usage.key_cert_sign:
            problems.append("its key usage allows signing certificates (keyCertSign)")
    try:
        constraints = extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        pass
    else:
        if constraints.ca:
            problems.append("it is a CA certificate (basicConstraints cA)")
    if profile.kind == AUTH:
        try:
            purposes = set(extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
        except x509.ExtensionNotFound:
            purposes = set()
        for wanted, what in (
            (ExtendedKeyUsageOID.SERVER_AUTH, "serverAuth"),
            (ExtendedKeyUsageOID.CLIENT_AUTH, "clientAuth"),
        ):
            if wanted not in purposes:
                problems.append(f"its extended key usage lacks {what}")
        try:
            alternative = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            alternative = x509.SubjectAlternativeName([])
        dns = alternative.get_values_for_type(x509.DNSName)
        expected = profile.dns_names[0] if profile.dns_names else "(none: no server id)"
        if expected not in dns:
            problems.append(
                f"its subject alternative names lack the DNS name {expected}, which peers "
                "verify for this server"
            )
        problems += _alternative_name_problems(alternative, expected)
    return problems


# a host name: letters, digits and hyphens in dot-separated labels of 1 to 63 characters
_HOST_NAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)


def _host_problem(host: str, own: str) -> str | None:
    """What is wrong with `host` as a name a server's TLS certificate carries besides its
    own verified name `own` (None: nothing)."""
    if host.lower() == own:
        return None
    if "*" in host:
        return f"{host!r} is a wildcard: a server's certificate names that server only"
    if host.lower().rstrip(".").endswith(SERVER_NAME_DOMAIN):
        return (
            f"{host!r} is another security server's verified name (names under "
            f"{SERVER_NAME_DOMAIN} are each one server's)"
        )
    # a host name, in ASCII (IDNA A-labels), whose last label is not a number
    if not _HOST_NAME.fullmatch(host) or host.rsplit(".", 1)[-1].isdigit():
        return f"{host!r} is not a host name (give international names as IDNA A-labels)"
    return None


def _alternative_name_problems(alternative: x509.SubjectAlternativeName, own: str) -> list[str]:
    """What a server's TLS certificate must not name besides its own verified name `own`:
    a wildcard, another name under `SERVER_NAME_DOMAIN` (peers would take its holder for
    another security server), anything that is not a host name or an address (a network,
    a URI, an e-mail address, a directory name)."""
    problems = []
    for name in alternative:
        if isinstance(name, x509.DNSName):
            problem = _host_problem(name.value, own)
            if problem:
                problems.append(f"its subject alternative name {problem}")
        elif isinstance(name, x509.IPAddress):
            if not isinstance(name.value, ipaddress.IPv4Address | ipaddress.IPv6Address):
                problems.append(
                    f"its subject alternative address {name.value} is a network, not an address"
                )
        else:
            problems.append(
                f"its subject alternative names include a {type(name).__name__}: a server's "
                "certificate names host names and addresses only"
            )
    return problems


def _readable(
    what: x509.Certificate | x509.CertificateSigningRequest,
) -> tuple[object, x509.Extensions | None, list[str]]:
    """The public key and extensions of `what`, and what kept either from being read (a
    key of an unknown kind, an extension given twice): hostile input is a problem to list,
    not a crash."""
    problems = []
    try:
        public_key: object = what.public_key()
    except (UnsupportedAlgorithm, ValueError) as exc:
        public_key = None
        problems.append(f"its key cannot be read: {exc}")
    try:
        extensions: x509.Extensions | None = what.extensions
    except (x509.DuplicateExtension, ValueError) as exc:
        extensions = None
        problems.append(f"its extensions cannot be read: {exc}")
    return public_key, extensions, problems


def check_request(profile: Profile, request: x509.CertificateSigningRequest) -> list[str]:
    """What is wrong with a request for `profile` (empty: nothing)."""
    public_key, extensions, problems = _readable(request)
    if public_key is not None:
        if not request.is_signature_valid:
            problems.append("its signature does not verify with its own key")
        problems += _key_problems(public_key)
    problems += _name_problems(profile, request.subject)
    if extensions is not None:
        problems += _extension_problems(profile, extensions)
    return problems


def check_certificate(
    profile: Profile,
    certificate: x509.Certificate,
    key: ec.EllipticCurvePrivateKey | None,
    *,
    now: datetime,
    ca: x509.Certificate | None = None,
) -> list[str]:
    """What is wrong with a certificate a CA returned for `profile` (empty: nothing): its
    key against `key`, its names, usages and validity at `now`, and, with `ca`, that the
    CA issued it."""
    public_key, extensions, problems = _readable(certificate)
    if public_key is not None:
        problems += _key_problems(public_key)
        if key is not None and public_key != key.public_key():
            problems.append("it is not the certificate of this key (the public keys differ)")
    problems += _name_problems(profile, certificate.subject)
    if extensions is not None:
        problems += _extension_problems(profile, extensions)
    if now < certificate.not_valid_before_utc:
        problems.append(f"it is not valid before {certificate.not_valid_before_utc.isoformat()}")
    if now > certificate.not_valid_after_utc:
        problems.append(f"it expired on {certificate.not_valid_after_utc.isoformat()}")
    if ca is not None:
        try:
            certificate.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            problems.append(f"it was not issued by the CA {', '.join(_common_names(ca.subject))}")
    return problems
