"""The configuration in parts (gateway/config_parts.py and the registry's book of parts):
a server gets exactly the agreements its subsystems are party to, a change moves only the
buckets it touches, and every way a registry (or whoever sits between) could hand over a
wrong part is refused with its reason, before anything is installed."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any

import pytest

from gateway import canonical
from gateway.agreements import Agreement, AgreementState
from gateway.config_parts import (
    DIGEST_BYTES,
    Held,
    Update,
    apply_update,
    bucket_of,
    build_directory,
    encode_bucket,
    sha256,
)
from gateway.configuration import catalogue_json, sign_configuration
from gateway.errors import AuthorizationError, Code
from gateway.identifiers import SubsystemId
from registry.parts import Buckets, agreement_bytes, join_bucket
from tests.unit.test_configuration import BENEFITS, IDENTITY, SS_BPS, SS_DNIC, World, expect_invalid

# the fixture `world` (a signed UY configuration), shared with the core's tests
from tests.unit.test_configuration import world as world

OTHER = SubsystemId.parse("UY/GOV/BPS/pensions")


@dataclasses.dataclass
class Registry:
    """What a registry holds to publish: the catalogue and the buckets, signed per version."""

    world: World
    catalogue: bytes
    buckets: Buckets
    version: int = 42

    def directory(self, **changes: Any) -> Any:
        content = build_directory(
            instance="UY",
            version=self.version,
            generated_at=self.world.now - timedelta(minutes=1),
            expires_at=self.world.now + timedelta(hours=1),
            catalogue_sha256=changes.get("catalogue_sha256", sha256(self.catalogue)),
            agreements_root=changes.get("agreements_root", self.buckets.root()),
        )
        return sign_configuration(content, self.world.config_signer)

    def snapshot(self, wanted: list[int], **changes: Any) -> Update:
        return Update(
            directory=self.directory(**changes),
            base_version=0,
            catalogue=self.catalogue,
            digests=bytes(self.buckets.digests),
            buckets={b: self.buckets.contents[b] for b in wanted},
        )


@pytest.fixture
def registry(world: World) -> Registry:
    args = world.content_args
    catalogue = catalogue_json(
        ca_certificates=args["ca_certificates"],
        members=args["members"],
        servers=args["servers"],
        services=args["services"],
    )
    return Registry(world, canonical.encode(catalogue), Buckets.of(args["agreements"]))


def held_by(registry: Registry, server: str = str(SS_DNIC)) -> Held:
    wanted = [bucket_of(IDENTITY)] if server == str(SS_DNIC) else [bucket_of(BENEFITS)]
    return apply_update(None, registry.snapshot(wanted), registry.world.anchor, server=server)


def test_each_side_of_an_agreement_gets_it_and_no_one_else(registry: Registry) -> None:
    """The provider's server (hosting the service's subsystem) and the consumer's (hosting
    the client) both hold the agreement; a server hosting neither holds none."""
    deal = registry.world.agreement
    for server in (SS_DNIC, SS_BPS):
        held = held_by(registry, str(server))
        decided = held.config.agreements.decide(
            deal.client, deal.service, "benefit-eligibility", registry.world.now
        )
        assert decided.id == deal.id
        assert held.config.version == 42 and len(held.config.servers) == 2
    stranger = apply_update(
        None, registry.snapshot([]), registry.world.anchor, server="UY/GOV/BPS/ss9"
    )
    assert len(stranger.config.agreements) == 0
    # the catalogue is whole for everyone: services and servers are known
    assert deal.service in stranger.config.services


def test_a_change_touches_only_its_buckets_and_arrives_as_a_delta(registry: Registry) -> None:
    """Revoking the agreement re-encodes only its two buckets; the delta carries the new
    digests and the wanted bucket, and the server refuses the agreement after it."""
    held = held_by(registry)
    revoked = dataclasses.replace(registry.world.agreement, state=AgreementState.REVOKED)
    change = registry.buckets.plan({revoked.id: revoked})
    assert set(change.contents) == {bucket_of(IDENTITY), bucket_of(BENEFITS)}
    root = registry.buckets.root_with(change)
    registry.buckets.apply(change)
    assert registry.buckets.root() == root
    registry.version = 43
    delta = Update(
        directory=registry.directory(),
        base_version=42,
        changed={b: registry.buckets.digest(b) for b in change.contents},
        buckets={bucket_of(IDENTITY): registry.buckets.contents[bucket_of(IDENTITY)]},
    )
    after = apply_update(held, delta, registry.world.anchor, server=str(SS_DNIC))
    assert after.config.version == 43
    with pytest.raises(AuthorizationError) as refused:
        after.config.agreements.decide(
            revoked.client, revoked.service, "benefit-eligibility", registry.world.now
        )
    assert refused.value.code is Code.AGREEMENT_REVOKED
    # a change of nothing: a new directory, and no part
    registry.version = 44
    quiet = Update(directory=registry.directory(), base_version=43)
    assert apply_update(after, quiet, registry.world.anchor, server=str(SS_DNIC)).buckets


def test_a_delta_that_does_not_chain_is_refused(registry: Registry) -> None:
    held = held_by(registry)
    registry.version = 44
    delta = Update(directory=registry.directory(), base_version=43)
    assert "does not apply to the version held, 42" in (
        expect_invalid(
            lambda: apply_update(held, delta, registry.world.anchor, server=str(SS_DNIC))
        ).message
    )


def test_an_older_or_equal_version_is_refused(registry: Registry) -> None:
    held = held_by(registry)
    for version in (41, 42):
        registry.version = version
        delta = Update(directory=registry.directory(), base_version=42)
        error = expect_invalid(
            lambda d=delta: apply_update(held, d, registry.world.anchor, server=str(SS_DNIC))  # type: ignore[misc]
        )
        assert "is not newer than the version held" in error.message


def test_a_bucket_that_does_not_match_its_digest_is_refused(registry: Registry) -> None:
    """A bucket whose content was changed (here: the agreement's purposes widened)."""
    b = bucket_of(IDENTITY)
    wider = dataclasses.replace(
        registry.world.agreement, purposes=frozenset({"benefit-eligibility", "anything"})
    )
    update = registry.snapshot([b])
    forged = dataclasses.replace(update, buckets={b: encode_bucket([wider])})
    error = expect_invalid(
        lambda: apply_update(None, forged, registry.world.anchor, server=str(SS_DNIC))
    )
    assert f"bucket {b} does not match its digest" in error.message


def test_digests_that_do_not_hash_to_the_signed_root_are_refused(registry: Registry) -> None:
    """The forged bucket with its digest swapped in: the signed root gives it away."""
    b = bucket_of(IDENTITY)
    update = registry.snapshot([b])
    assert update.digests is not None
    digests = bytearray(update.digests)
    digests[b * DIGEST_BYTES : (b + 1) * DIGEST_BYTES] = sha256(encode_bucket([]))
    forged = dataclasses.replace(update, digests=bytes(digests), buckets={})
    error = expect_invalid(
        lambda: apply_update(None, forged, registry.world.anchor, server=str(SS_DNIC))
    )
    assert "do not hash to the directory's agreements root" in error.message


def test_a_directory_with_a_bad_signature_is_refused(registry: Registry) -> None:
    update = registry.snapshot([bucket_of(IDENTITY)])
    content = update.directory.content.replace(b'"version":42', b'"version":99')
    forged = dataclasses.replace(
        update, directory=dataclasses.replace(update.directory, content=content)
    )
    error = expect_invalid(
        lambda: apply_update(None, forged, registry.world.anchor, server=str(SS_DNIC))
    )
    assert "signature does not verify" in error.message


def test_a_catalogue_that_changed_and_is_missing_or_altered_is_refused(registry: Registry) -> None:
    held = held_by(registry)
    registry.version = 43
    other = registry.catalogue.replace(b"Person lookup", b"Person lookup!")
    missing = Update(directory=registry.directory(catalogue_sha256=sha256(other)), base_version=42)
    assert "does not carry it" in (
        expect_invalid(
            lambda: apply_update(held, missing, registry.world.anchor, server=str(SS_DNIC))
        ).message
    )
    altered = Update(directory=registry.directory(), base_version=42, catalogue=other)
    assert "catalogue does not match" in (
        expect_invalid(
            lambda: apply_update(held, altered, registry.world.anchor, server=str(SS_DNIC))
        ).message
    )


def test_a_wanted_bucket_left_out_is_refused(registry: Registry) -> None:
    update = registry.snapshot([])
    error = expect_invalid(
        lambda: apply_update(None, update, registry.world.anchor, server=str(SS_DNIC))
    )
    assert f"bucket {bucket_of(IDENTITY)}, which this server needs, is missing" in error.message


def test_an_agreement_in_a_bucket_not_its_own_is_refused(registry: Registry) -> None:
    """A registry cannot slip an agreement to a server through another subsystem's bucket:
    the bucket of a subsystem X lists an agreement between OTHER and IDENTITY."""
    stray = Agreement(
        id="AG-STRAY",
        client=OTHER,
        service=registry.world.agreement.service,
        purposes=frozenset({"x"}),
        valid_from=registry.world.now - timedelta(days=1),
    )
    x = next(
        sub
        for sub in (SubsystemId.parse(f"UY/GOV/BPS/s{i}") for i in range(100))
        if bucket_of(sub) not in {bucket_of(OTHER), bucket_of(IDENTITY), bucket_of(BENEFITS)}
    )
    wrong = bucket_of(x)
    registry.buckets.agreements[wrong][stray.id] = agreement_bytes(stray)
    registry.buckets._encode(wrong)
    error = expect_invalid(
        lambda: apply_update(
            None,
            registry.snapshot([wrong]),
            registry.world.anchor,
            server="UY/GOV/BPS/ss9",
            subsystems=[str(x)],
        )
    )
    assert f"agreement AG-STRAY is listed in bucket {wrong}, not one of its own" in error.message


def test_the_registry_joins_a_bucket_into_the_same_bytes_as_encoding_it(world: World) -> None:
    """The registry keeps each agreement's canonical JSON and joins a bucket from them: the
    bytes are exactly the bucket's canonical encoding, whatever the order of ids."""
    deal = world.agreement
    others = [dataclasses.replace(deal, id=f"AG-{n:03d}") for n in (7, 100, 3)]
    listed = {a.id: agreement_bytes(a) for a in [deal, *others]}
    assert join_bucket(listed) == encode_bucket([deal, *others])
    assert join_bucket({}) == encode_bucket([])
