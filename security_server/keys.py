"""The server's own keys, and their renewal without a restart (SIGHUP).

On SIGHUP the server reads its settings file again and loads the authentication (TLS) and
signing keys and certificates it names. It switches to them only when every check passes,
in this order, and otherwise keeps the keys it has and logs `keys_not_reloaded` with the
reason:

1. each key matches its certificate;
2. the authentication certificate is registered for this server in the configuration it
   holds (`gateway admin servers renew`, approved), since peers refuse any other;
3. each signing certificate names its member, is a signing certificate and is issued by
   a CA of the configuration;
4. the CA's OCSP responder has answered "good" about each new certificate, since peers
   refuse a message without a fresh answer.

Then new handshakes on the provider endpoint present the new certificate, new streams to
providers open with it (streams already open finish on the old one), new envelopes are
signed with the new signing keys, and checkpoints are signed with the new key. The other
settings are read but not applied: each one that changed is logged as
`setting_needs_restart` (see the README for which settings need a restart).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.configuration import GlobalConfiguration
from gateway.errors import ConfigFileError, GatewayError
from gateway.identifiers import MemberId, SecurityServerId
from gateway.signing import EcdsaSigner, load_certificate, load_private_key
from security_server.settings import ServerSettings

log = structlog.get_logger("security_server.keys")

# the settings a reload applies; every other one needs a restart
RELOADED = ("provider.tls_certificate", "provider.tls_key", "signing")


@dataclass(frozen=True, slots=True)
class Keys:
    """The authentication certificate and key (PEM, as gRPC takes them) and a signer per
    member."""

    tls_certificate: bytes
    tls_key: bytes
    auth_certificate: x509.Certificate
    signers: dict[MemberId, EcdsaSigner]

    @property
    def auth_der(self) -> bytes:
        return self.auth_certificate.public_bytes(serialization.Encoding.DER)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigFileError(f"{what}: cannot read {path}: {exc.strerror}") from None


def _signer(key_pem: bytes, certificate_pem: bytes, what: str) -> EcdsaSigner:
    try:
        key = load_private_key(key_pem)
        certificate = load_certificate(certificate_pem)
        if key.public_key() != certificate.public_key():
            raise ValueError("the key is not the key of the certificate")
        return EcdsaSigner(key, certificate)
    except (ValueError, TypeError) as exc:
        raise ConfigFileError(f"{what}: {exc}") from None


def load_keys(settings: ServerSettings) -> Keys:
    """The keys the settings name, each checked against its certificate."""
    tls_certificate = _read(settings.provider.tls_certificate, "provider.tls_certificate")
    tls_key = _read(settings.provider.tls_key, "provider.tls_key")
    auth = _signer(tls_key, tls_certificate, "provider.tls_key")
    signers = {
        MemberId.parse(member): _signer(
            _read(paths.key, f"signing.{member}.key"),
            _read(paths.certificate, f"signing.{member}.certificate"),
            f"signing.{member}",
        )
        for member, paths in settings.signing.items()
    }
    return Keys(tls_certificate, tls_key, auth.certificate, signers)


def check_keys(
    keys: Keys, server: SecurityServerId, config: GlobalConfiguration, now: datetime
) -> None:
    """Raise `ConfigFileError` unless peers would accept these keys under `config`."""
    entry = config.servers.get(server)
    if entry is None:
        raise ConfigFileError(f"the configuration does not list this server ({server})")
    if keys.auth_der not in entry.auth_certificates:
        raise ConfigFileError(
            "the authentication certificate in provider.tls_certificate is not registered "
            f"for {server}: register it with `gateway admin servers renew`, wait for its "
            "approval to reach this server, then reload"
        )
    for member, signer in keys.signers.items():
        try:
            _, named = config.trust.signing_member(signer.certificate_der, now)
        except GatewayError as exc:
            raise ConfigFileError(f"signing.{member}: {exc.message}") from None
        if named != member:
            raise ConfigFileError(f"signing.{member}: the certificate names {named}")


def changed_settings(old: ServerSettings, new: ServerSettings) -> list[str]:
    """The dotted names of the settings that differ, but those a reload applies."""

    def flat(value: Any, prefix: str) -> dict[str, Any]:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out: dict[str, Any] = {}
            for f in dataclasses.fields(value):
                out |= flat(getattr(value, f.name), f"{prefix}{f.name}.")
            return out
        return {prefix.rstrip("."): value}

    before, after = flat(old, ""), flat(new, "")
    return sorted(
        name
        for name in before.keys() | after.keys()
        if before.get(name) != after.get(name)
        and not any(name == r or name.startswith(r + ".") for r in RELOADED)
    )


class KeyReloader:
    """Reads the settings file again and switches to the keys it names, all or nothing."""

    def __init__(
        self,
        *,
        settings: ServerSettings,
        read: Callable[[], ServerSettings],
        config: Callable[[], GlobalConfiguration | None],
        fetch_status: Callable[[list[x509.Certificate]], Any],
        install: Callable[[Keys], None],
        clock: Callable[[], datetime],
        keys: Keys,
    ) -> None:
        self.settings = settings
        self.read = read
        self.config = config
        self.fetch_status = fetch_status
        self.install = install
        self.clock = clock
        self.keys = keys

    async def reload(self) -> bool:
        """Apply the keys of the settings file; False (logged) when they stay as they were."""
        try:
            settings = self.read()
            keys = load_keys(settings)
            config = self.config()
            if config is None:
                raise ConfigFileError("no configuration yet to check the new keys against")
            server = SecurityServerId.parse(self.settings.server.id)
            check_keys(keys, server, config, self.clock())
            held = {self.keys.auth_der, *(s.certificate_der for s in self.keys.signers.values())}
            new = [
                c
                for c in (keys.auth_certificate, *(s.certificate for s in keys.signers.values()))
                if c.public_bytes(serialization.Encoding.DER) not in held
            ]
            if new:
                await self.fetch_status(new)
        except (ConfigFileError, GatewayError) as exc:
            reason = exc.message if isinstance(exc, GatewayError) else str(exc)
            log.error("keys_not_reloaded", reason=reason)
            return False
        for name in changed_settings(self.settings, settings):
            log.warning("setting_needs_restart", setting=name)
        self.install(keys)
        self.keys = keys
        log.info(
            "keys_reloaded",
            auth_certificate=keys.auth_certificate.serial_number,
            new_certificates=len(new),
        )
        return True
