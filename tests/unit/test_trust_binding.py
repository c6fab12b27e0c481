"""Unit tests of the security server's trust boundaries between instances, without I/O:
the provider's binding of a peer to one instance, a federation ended on either side, the
configuration client keeping its last good copy, and claims in refusal records."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography.hazmat.primitives import serialization

from gateway.configuration import (
    Anchor,
    Federation,
    GlobalConfiguration,
    Member,
    SecurityServer,
    build_content,
    parse_content,
    sign_configuration,
)
from gateway.errors import Code, ConfigurationError, GatewayError
from gateway.exchange import Claims, Peer, registered_peer
from gateway.identifiers import MemberId, SecurityServerId
from gateway.records import Facts, claimed
from gateway.signing import EcdsaSigner
from security_server.certificate_status import der_sha256
from security_server.config_client import ConfigurationClient
from security_server.federation import Federations
from security_server.provider import ProviderService
from tests.unit.test_configuration import SS_DNIC, World

# the fixture `world` (a signed UY configuration), shared with the core's tests
from tests.unit.test_configuration import world as world

IssueCert = Any


def _client(world: World, tmp_path: Path, config: GlobalConfiguration) -> ConfigurationClient:
    client = ConfigurationClient(
        anchor=world.anchor, cache_file=tmp_path / "configuration.json", clock=lambda: world.now
    )
    client.current = config
    return client


class _Found:
    """A Federations whose look-up finds what it is told to (as if a configuration had
    somehow listed it)."""

    def __init__(self, found: tuple[GlobalConfiguration, Any] | None, own: Any) -> None:
        self.found = found
        self.own = own

    def server_by_certificate(
        self, fingerprint: str, now: datetime, claimed: str | None = None
    ) -> Any:
        return self.found

    def ended(self, instance: str, now: datetime) -> bool:
        return Federations.ended(cast(Federations, self), instance, now)


def test_a_server_registered_by_another_instance_is_refused(world: World, tmp_path: Path) -> None:
    """Defence in depth: a configuration of AR that lists UY's server (parse_content refuses
    one, but the provider never relies on that) does not make the server acceptable."""
    ours = parse_content(world.content)
    theirs = dataclasses.replace(ours, instance="AR")
    federations = _Found((theirs, ours.servers[SS_DNIC]), _client(world, tmp_path, ours))
    with pytest.raises(GatewayError) as info:
        registered_peer(cast(Federations, federations), Peer(None, "x"), world.now)
    assert info.value.code is Code.PEER_MEMBER_MISMATCH
    # the same server registered by its own instance is accepted
    federations.found = (ours, ours.servers[SS_DNIC])
    assert (
        registered_peer(cast(Federations, federations), Peer(None, "x"), world.now)[1].id == SS_DNIC
    )


def _with_federation(world: World, issue: IssueCert, *, active: bool) -> GlobalConfiguration:
    anchor = Anchor(
        instance="AR",
        signing_certificates=(issue("AR configuration", kind="config").certificate_der,),
        addresses=("registry.gob.ar:7000",),
    )
    federation = Federation(
        anchor=anchor,
        active=active,
        since=world.now - timedelta(days=2),
        ended_at=None if active else world.now - timedelta(hours=1),
    )
    return parse_content(build_content(**{**world.content_args, "federations": [federation]}))


@pytest.mark.parametrize(
    ("claimed_by_peer", "active", "code"),
    [
        ("AR", False, Code.FEDERATION_ENDED),
        ("AR", True, Code.PEER_NOT_REGISTERED),
        ("BR", False, Code.PEER_NOT_REGISTERED),
        (None, False, Code.PEER_NOT_REGISTERED),
    ],
)
def test_an_unknown_peer_of_an_ended_federation_is_told_so(
    world: World,
    issue: IssueCert,
    tmp_path: Path,
    claimed_by_peer: str | None,
    active: bool,
    code: Code,
) -> None:
    """A peer our configuration does not know, whose certificate names an instance we ended
    the federation with, gets federation_ended; any other unknown peer peer_not_registered."""
    own = _client(world, tmp_path, _with_federation(world, issue, active=active))
    certificate = (
        issue(f"{claimed_by_peer}/GOV/X/ss1", kind="auth").certificate if claimed_by_peer else None
    )
    with pytest.raises(GatewayError) as info:
        registered_peer(cast(Federations, _Found(None, own)), Peer(certificate, "x"), world.now)
    assert info.value.code is code


def test_a_federation_ended_by_the_other_instance_is_refused_as_ended(
    world: World, issue: IssueCert, tmp_path: Path
) -> None:
    """When the provider's instance's configuration lists ours as ended, a cross-border
    call is refused with federation_ended (not by the provider with peer_not_registered)."""
    ours = _with_federation(world, issue, active=True)
    uy_anchor = Federation(anchor=world.anchor, active=False, since=world.now, ended_at=world.now)
    theirs = parse_content(
        build_content(
            **{
                **world.content_args,
                "instance": "AR",
                "members": [Member(id=MemberId.parse("AR/GOB/RENAPER"), name="RENAPER")],
                "servers": [],
                "services": [],
                "agreements": [],
                "federations": [uy_anchor],
            }
        )
    )
    federations = Federations(
        _client(world, tmp_path, ours),
        allowed=frozenset({"AR"}),
        state_dir=tmp_path,
        clock=lambda: world.now,
    )
    federations.clients["AR"] = _client(world, tmp_path, theirs)
    with pytest.raises(GatewayError) as info:
        federations.require("AR", world.now)
    assert info.value.code is Code.FEDERATION_ENDED
    assert "AR ended its federation with instance UY" in info.value.message
    federations.clients["AR"].current = dataclasses.replace(theirs, federations={})
    assert federations.require("AR", world.now).instance == "AR"


def test_an_instance_listing_a_third_ones_server_certificate_does_not_take_its_peers(
    world: World, issue: IssueCert, tmp_path: Path
) -> None:
    """AR copies the TLS certificate of BR's server, public in BR's configuration, under a
    server of its own. A peer presenting that certificate names BR's server: it is taken as
    BR's, whichever federated configuration is looked at first (AR's would otherwise have
    it refused as peer_member_mismatch: a way for AR to cut BR off from UY)."""
    br_server = SecurityServerId.parse("BR/GOV/SUS/ss1")
    stolen = issue(str(br_server), kind="auth").certificate
    der = stolen.public_bytes(serialization.Encoding.DER)
    anchors = {
        instance: Anchor(
            instance=instance,
            signing_certificates=(
                issue(f"{instance} configuration", kind="config").certificate_der,
            ),
            addresses=(f"registry.{instance.lower()}:7000",),
        )
        for instance in ("AR", "BR")
    }
    ours = parse_content(
        build_content(
            **{
                **world.content_args,
                "federations": [
                    Federation(anchor=a, active=True, since=world.now - timedelta(days=2))
                    for a in anchors.values()
                ],
            }
        )
    )

    def instance_config(instance: str, member: str, server: str) -> GlobalConfiguration:
        return parse_content(
            build_content(
                **{
                    **world.content_args,
                    "instance": instance,
                    "members": [Member(id=MemberId.parse(member), name=member)],
                    "servers": [
                        SecurityServer(
                            id=SecurityServerId.parse(server),
                            address="10.0.0.1:7443",
                            auth_certificate=der,
                            subsystems=(),
                        )
                    ],
                    "services": [],
                    "agreements": [],
                    "federations": [],
                }
            )
        )

    federations = Federations(
        _client(world, tmp_path, ours),
        allowed=frozenset({"AR", "BR"}),
        state_dir=tmp_path,
        clock=lambda: world.now,
    )
    # AR's looked at first
    federations.clients["AR"] = _client(
        world, tmp_path, instance_config("AR", "AR/GOB/MINSAL", "AR/GOB/MINSAL/ss9")
    )
    federations.clients["BR"] = _client(
        world, tmp_path, instance_config("BR", "BR/GOV/SUS", str(br_server))
    )
    config, server = registered_peer(federations, Peer(stolen, der_sha256(stolen)), world.now)
    assert (config.instance, server.id) == ("BR", br_server)


def test_the_configuration_client_keeps_its_last_good_copy(world: World, tmp_path: Path) -> None:
    """A configuration of our own instance that lists another instance's member is refused
    (configuration_invalid, naming it); the client keeps serving the last good copy, on
    disk too."""
    client = ConfigurationClient(
        anchor=world.anchor, cache_file=tmp_path / "configuration.json", clock=lambda: world.now
    )
    assert client.accept(world.signed)
    on_disk = client.cache_file.read_bytes()
    foreign = Member(id=MemberId.parse("AR/GOB/RENAPER"), name="not ours")
    poisoned = build_content(
        **{
            **world.content_args,
            "version": 43,
            "members": [*world.content_args["members"], foreign],
        }
    )
    with pytest.raises(ConfigurationError) as info:
        client.accept(sign_configuration(poisoned, world.config_signer))
    assert info.value.code is Code.CONFIGURATION_INVALID
    assert "member AR/GOB/RENAPER" in info.value.message
    assert client.current is not None and client.current.version == 42
    assert client.cache_file.read_bytes() == on_disk


def test_claims_are_marked_escaped_and_bounded() -> None:
    """An unverified value is stored as claimed:<value>, control characters escaped, cut
    to 200 characters with a digest of the whole; the prefix never matches a member's."""
    assert claimed("UY/GOV/MSP/clinics") == "claimed:UY/GOV/MSP/clinics"
    assert claimed(None) is None
    assert claimed("UY/GOV/MSP/a\x00\n\x1b") == "claimed:UY/GOV/MSP/a\\x00\\n\\x1b"
    long = claimed("UY/GOV/MSP/" + "\\" * 7000)
    assert long is not None and len(long) <= 256
    assert long.startswith("claimed:UY/GOV/MSP/") and "…sha256:" in long
    assert claimed("UY/GOV/MSP/" + "\\" * 7001) != long
    assert not (claimed("UY/GOV/MSP/x") or "").startswith("UY/GOV/MSP/")


def test_claims_are_read_from_any_header_without_trusting_it(
    auth_signer: EcdsaSigner, issue: IssueCert
) -> None:
    """The parties a header names are read even from a header that does not check, and
    nothing from one that is not canonical JSON; a certificate's claimed instance is read
    from its subject."""
    read = Claims.read(b'{"client":"UY/GOV/MSP/x","message_id":"m-1","service":7}')
    assert read == Claims(client="UY/GOV/MSP/x")
    assert read.facts() == Facts(message_id=None, client="claimed:UY/GOV/MSP/x", service=None)
    assert Claims.read(b"\xff not json") == Claims()
    assert Claims.read(b"[1]") == Claims()
    assert Peer(auth_signer.certificate, None).claimed_instance == "UY"
    assert Peer(issue("not a server id", kind="auth").certificate, None).claimed_instance is None
    assert Peer(None, None).claimed_instance is None


async def test_a_refused_peers_undecodable_first_message_still_leaves_a_refusal() -> None:
    """A refused peer whose first message gRPC cannot decode gets no claims read, instead
    of an exception that would skip the refusal record and its coded answer."""
    from google.protobuf.message import DecodeError

    async def undecodable() -> AsyncIterator[Any]:
        raise DecodeError("Error parsing message")
        yield  # an async generator, as gRPC's request iterator

    assert await ProviderService._first_claims(undecodable()) == Claims()
