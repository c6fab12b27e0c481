"""Renewal on SIGHUP (`security_server.keys`): a server switches to the keys its settings
name only when peers would accept them, all or nothing, and says why it did not."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from certs import pki
from certs.pki import Issued
from gateway.configuration import (
    GlobalConfiguration,
    Member,
    SecurityServer,
    build_content,
    parse_content,
)
from gateway.errors import ConfigFileError, GatewayError
from gateway.identifiers import MemberId, SecurityServerId, SubsystemId
from gateway.settings import load_settings
from gateway.signing import EcdsaSigner
from security_server.keys import KeyReloader, Keys, changed_settings, check_keys, load_keys
from security_server.settings import ServerSettings

SERVER = SecurityServerId.parse("UY/GOV/MIDES/ss1")
MEMBER = MemberId.parse("UY/GOV/MIDES")


def write_pair(folder: Path, name: str, signer: EcdsaSigner) -> tuple[str, str]:
    cert, key = pki.write_pair(folder, name, Issued(key=signer.key, certificate=signer.certificate))
    return str(cert), str(key)


def settings_for(
    folder: Path, auth: EcdsaSigner, sign: EcdsaSigner, **extra: Any
) -> ServerSettings:
    cert, key = write_pair(folder, "auth", auth)
    sign_cert, sign_key = write_pair(folder, "sign", sign)
    doc = {
        "server": {"id": str(SERVER), "anchor": "/srv/anchor.json", "state_dir": "/srv/state"},
        "provider": {"listen": "127.0.0.1:0", "tls_certificate": cert, "tls_key": key},
        "signing": {str(MEMBER): {"certificate": sign_cert, "key": sign_key}},
        **extra,
    }
    return load_settings(ServerSettings, doc, base=folder, env={})


def configuration(ca: EcdsaSigner, now: datetime, *auth: EcdsaSigner) -> GlobalConfiguration:
    return parse_content(
        build_content(
            instance="UY",
            version=1,
            generated_at=now,
            expires_at=now,
            ca_certificates=[ca.certificate_der],
            members=[Member(id=MEMBER, name="MIDES")],
            servers=[
                SecurityServer(
                    id=SERVER,
                    address="127.0.0.1:1",
                    auth_certificate=auth[0].certificate_der,
                    next_auth_certificates=tuple(a.certificate_der for a in auth[1:]),
                    subsystems=(SubsystemId.parse("UY/GOV/MIDES/benefits"),),
                )
            ],
            services=[],
            agreements=[],
        )
    )


def test_keys_are_checked_against_the_configuration(
    tmp_path: Path, ca: EcdsaSigner, issue: Any, now: datetime
) -> None:
    old, new = issue(str(SERVER), kind="auth"), issue(str(SERVER), kind="auth")
    sign = issue(str(MEMBER), kind="sign")
    keys = load_keys(settings_for(tmp_path, new, sign))
    with pytest.raises(ConfigFileError, match="not registered for UY/GOV/MIDES/ss1"):
        check_keys(keys, SERVER, configuration(ca, now, old), now)
    check_keys(keys, SERVER, configuration(ca, now, old, new), now)
    # a signing certificate of another member, or an authentication one, is refused
    other = issue("UY/GOV/DNIC", kind="sign")
    with pytest.raises(ConfigFileError, match="names UY/GOV/DNIC"):
        check_keys(
            load_keys(settings_for(tmp_path / "b", new, other)),
            SERVER,
            configuration(ca, now, old, new),
            now,
        )
    # a key that is not the certificate's
    stray = issue(str(SERVER), kind="auth")
    settings = settings_for(tmp_path / "c", new, sign)
    write_pair(tmp_path / "stray", "auth", stray)
    settings.provider.tls_key.write_bytes((tmp_path / "stray" / "auth.key").read_bytes())
    with pytest.raises(ConfigFileError, match="not the key of the certificate"):
        load_keys(settings)


async def test_a_reload_switches_all_keys_or_none(
    tmp_path: Path, ca: EcdsaSigner, issue: Any, now: datetime
) -> None:
    old, new = issue(str(SERVER), kind="auth"), issue(str(SERVER), kind="auth")
    sign = issue(str(MEMBER), kind="sign")
    running = settings_for(tmp_path / "old", old, sign)
    reread = settings_for(tmp_path / "new", new, sign, log={"max_batch": 7})
    installed: list[Keys] = []
    fetched: list[Any] = []
    config = {"current": configuration(ca, now, old)}
    ocsp_down = [False]

    async def fetch(certificates: list[Any]) -> None:
        fetched.append(certificates)
        if ocsp_down[0]:
            raise GatewayError("no usable OCSP answer")

    reloader = KeyReloader(
        settings=running,
        read=lambda: reread,
        config=lambda: config["current"],
        fetch_status=fetch,
        install=installed.append,
        clock=lambda: now,
        keys=load_keys(running),
    )
    assert not await reloader.reload()  # not registered yet
    assert installed == [] and fetched == []
    config["current"] = configuration(ca, now, old, new)
    ocsp_down[0] = True
    assert not await reloader.reload()  # no OCSP answer about the new certificate
    assert installed == []
    ocsp_down[0] = False
    assert await reloader.reload()
    [keys] = installed
    assert keys.auth_certificate == new.certificate
    # only the new certificate's status was fetched: the signing one did not change
    assert [c.serial_number for c in fetched[-1]] == [new.certificate.serial_number]
    assert changed_settings(running, reread) == ["log.max_batch"]
