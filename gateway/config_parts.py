"""The configuration in parts (format 2): a small signed directory over content-addressed parts.

A national instance's configuration is tens of MB, almost all of it agreements, and a
security server needs only the few agreements its own subsystems are party to. So the
registry publishes it as:

- the **catalogue** part: CAs, members, servers, services, federations, outbound approvals
  (`catalogue_json`, a few MB at most; it changes when a server or service does);
- **agreement buckets**: `BUCKETS` parts; an agreement is in the bucket of its client
  subsystem and in the bucket of its service's subsystem (`bucket_of`, from the
  subsystem's id alone), so a server holding the buckets of the subsystems it hosts holds
  every agreement it can be asked to decide, as consumer or as provider, and nothing it
  needs is anywhere else. An agreement change touches at most two buckets;
- the **directory**, the only signed part: instance, version, validity, the catalogue's
  SHA-256 and `agreements_root`, the SHA-256 of the `BUCKETS` bucket digests in order.

A server holds the directory, the catalogue, all bucket digests (32 bytes each) and the
contents of the buckets it wants. An update gives a new directory, the digests that
changed and the contents of changed buckets it wants; the server checks that the digests
it then holds hash to the signed root, and each content against its digest, so a part
that is missing, altered or from another version is refused. Why buckets by subsystem
rather than one part per subsystem: the directory and the digests stay a fixed, small
size whatever the number of subsystems, and a bucket's position needs no look-up.

Building blocks only: no clock, files or network.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from datetime import datetime
from typing import Any

from gateway import canonical
from gateway.agreements import Agreement, AgreementIndex
from gateway.configuration import (
    Anchor,
    GlobalConfiguration,
    SignedConfiguration,
    _invalid,
    assemble,
    check_own_instance,
    check_signed,
)
from gateway.errors import ConfigurationError, GatewayError
from gateway.identifiers import SubsystemId
from gateway.timeutil import format_time, parse_time

FORMAT = 2
# agreement buckets of an instance: 4096 keeps a bucket at about 50 agreements for 100,000
# of them, so a change moves a few KB, while all digests stay 128 KB
BUCKETS = 4096
DIGEST_BYTES = 32
EMPTY_BUCKET = canonical.encode({"agreements": []})
EMPTY_DIGEST = hashlib.sha256(EMPTY_BUCKET).digest()


def bucket_of(subsystem: SubsystemId | str) -> int:
    """The bucket of a subsystem's agreements: from the SHA-256 of its id."""
    digest = hashlib.sha256(str(subsystem).encode()).digest()
    return int.from_bytes(digest[:4], "big") % BUCKETS


def buckets_of(agreement: Agreement) -> frozenset[int]:
    """The buckets an agreement is listed in: its client's and its service's subsystem's."""
    return frozenset((bucket_of(agreement.client), bucket_of(agreement.service.subsystem)))


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def encode_bucket(agreements: Iterable[Agreement]) -> bytes:
    """A bucket's canonical content: its agreements, by id."""
    return canonical.encode(
        {"agreements": sorted((a.to_json() for a in agreements), key=lambda d: str(d["id"]))}
    )


def agreements_root(digests: bytes) -> bytes:
    """The root the directory signs over all bucket digests, in bucket order."""
    if len(digests) != BUCKETS * DIGEST_BYTES:
        raise _invalid(f"{len(digests)} bytes of bucket digests, not {BUCKETS * DIGEST_BYTES}")
    return sha256(digests)


@dataclass(frozen=True, slots=True, kw_only=True)
class Directory:
    """A verified directory: what a version of the configuration consists of."""

    instance: str
    version: int
    generated_at: datetime
    expires_at: datetime
    catalogue_sha256: bytes
    agreements_root: bytes

    def header(self) -> dict[str, Any]:
        return {
            "instance": self.instance,
            "version": self.version,
            "generated_at": format_time(self.generated_at),
            "expires_at": format_time(self.expires_at),
        }


def build_directory(
    *,
    instance: str,
    version: int,
    generated_at: datetime,
    expires_at: datetime,
    catalogue_sha256: bytes,
    agreements_root: bytes,
) -> bytes:
    """The canonical bytes of a directory (what the registry signs)."""
    return canonical.encode(
        {
            "format": FORMAT,
            "instance": instance,
            "version": version,
            "generated_at": format_time(generated_at),
            "expires_at": format_time(expires_at),
            "catalogue_sha256": catalogue_sha256.hex(),
            "buckets": BUCKETS,
            "agreements_root": agreements_root.hex(),
        }
    )


def verify_directory(signed: SignedConfiguration, anchor: Anchor) -> Directory:
    """Verify a signed directory against the instance anchor and parse it."""
    check_signed(signed, anchor)
    try:
        doc = canonical.decode(signed.content)
        if doc["format"] != FORMAT or doc["buckets"] != BUCKETS:
            raise _invalid(f"directory format {doc['format']!r} with {doc['buckets']!r} buckets")
        directory = Directory(
            instance=str(doc["instance"]),
            version=int(doc["version"]),
            generated_at=parse_time(doc["generated_at"]),
            expires_at=parse_time(doc["expires_at"]),
            catalogue_sha256=bytes.fromhex(doc["catalogue_sha256"]),
            agreements_root=bytes.fromhex(doc["agreements_root"]),
        )
    except ConfigurationError:
        raise
    except (GatewayError, canonical.NotCanonicalError, KeyError, TypeError, ValueError) as exc:
        raise _invalid(f"the directory is malformed ({type(exc).__name__}: {exc})") from None
    if directory.instance != anchor.instance:
        raise _invalid(
            f"the directory is for instance {directory.instance!r}, "
            f"the anchor for {anchor.instance!r}"
        )
    if len(directory.catalogue_sha256) != DIGEST_BYTES or len(directory.agreements_root) != 32:
        raise _invalid("the directory's digests are not SHA-256 digests")
    return directory


def parse_catalogue(content: bytes) -> dict[str, Any]:
    """A catalogue part's content, decoded (checked in `assemble_parts`)."""
    try:
        doc = canonical.decode(content)
    except (canonical.NotCanonicalError, ValueError) as exc:
        raise _invalid(f"the catalogue is malformed ({exc})") from None
    if not isinstance(doc, dict):
        raise _invalid("the catalogue is not an object")
    return doc


def parse_bucket(content: bytes, bucket: int) -> tuple[Agreement, ...]:
    """A bucket's agreements; each must belong in this bucket."""
    try:
        doc = canonical.decode(content)
        agreements = tuple(Agreement.from_json(d) for d in doc["agreements"])
    except (GatewayError, canonical.NotCanonicalError, KeyError, TypeError, ValueError) as exc:
        raise _invalid(f"bucket {bucket} is malformed ({type(exc).__name__}: {exc})") from None
    for a in agreements:
        if bucket not in buckets_of(a):
            raise _invalid(f"agreement {a.id} is listed in bucket {bucket}, not one of its own")
    return agreements


def assemble_parts(
    directory: Directory,
    catalogue: Mapping[str, Any],
    buckets: Sequence[Iterable[Agreement]],
    previous: GlobalConfiguration | None = None,
) -> GlobalConfiguration:
    """The configuration a server decides with: the catalogue, and the agreements of the
    buckets it holds (an agreement in two of them counted once). `previous`, a
    configuration built from this same catalogue, lends its parsed catalogue: then only the
    agreements are checked and indexed anew (a change costs what changed, not the
    thousands of members, servers and services)."""
    unique: dict[str, Agreement] = {}
    for bucket in buckets:
        for a in bucket:
            unique[a.id] = a
    if previous is not None:
        check_own_instance(directory.instance, (), (), (), unique.values(), ())
        return dataclasses.replace(
            previous,
            version=directory.version,
            generated_at=directory.generated_at,
            expires_at=directory.expires_at,
            agreements=AgreementIndex(unique.values()),
        )
    try:
        return assemble(directory.header(), catalogue, unique.values())
    except ConfigurationError:
        raise
    except (GatewayError, KeyError, TypeError, ValueError) as exc:
        raise _invalid(f"the catalogue is malformed ({type(exc).__name__}: {exc})") from None


def wanted_buckets(
    catalogue_servers: Iterable[Mapping[str, Any]], server: str, extra: Iterable[str]
) -> frozenset[int]:
    """The buckets a server wants: those of the subsystems the catalogue says it hosts, and
    of `extra` subsystems (for a federated instance: the ones it hosts in its own)."""
    hosted = [
        sub for d in catalogue_servers if d.get("id") == server for sub in d.get("subsystems", [])
    ]
    return frozenset(bucket_of(str(s)) for s in [*hosted, *extra])


@dataclass(frozen=True, slots=True, kw_only=True)
class Update:
    """One message of a parts watch, inflated (see `PartsUpdate` in configuration.proto)."""

    directory: SignedConfiguration
    # 0: a snapshot (catalogue and digests present); else the version it applies to
    base_version: int
    catalogue: bytes | None = None
    digests: bytes | None = None
    changed: Mapping[int, bytes] = dataclass_field(default_factory=dict)
    buckets: Mapping[int, bytes] = dataclass_field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class Held:
    """What a server holds of an instance's configuration: the signed directory, the
    catalogue, every bucket digest, the wanted buckets (content and agreements) and the
    configuration they make."""

    signed: SignedConfiguration
    directory: Directory
    catalogue: bytes
    catalogue_doc: Mapping[str, Any]
    digests: bytes
    buckets: Mapping[int, tuple[bytes, tuple[Agreement, ...]]]
    config: GlobalConfiguration


def apply_update(
    held: Held | None,
    update: Update,
    anchor: Anchor,
    *,
    server: str,
    subsystems: Iterable[str] = (),
) -> Held:
    """Check an update against the anchor and what is held, and give what is held after it.

    Refused with `ConfigurationError(CONFIGURATION_INVALID)`, naming why: a directory that
    does not verify, a version not newer than the one held, a delta that does not apply to
    the version held, digests that do not hash to the signed root, a catalogue or bucket
    whose content does not match its digest, a wanted bucket missing, or malformed content.
    """
    directory = verify_directory(update.directory, anchor)
    if held is not None and directory.version <= held.directory.version:
        raise _invalid(
            f"version {directory.version} is not newer than the version held, "
            f"{held.directory.version}"
        )
    if update.base_version == 0:
        if update.catalogue is None or update.digests is None:
            raise _invalid("a snapshot without its catalogue or bucket digests")
        digests = update.digests
        kept: Mapping[int, tuple[bytes, tuple[Agreement, ...]]] = {}
        catalogue, catalogue_doc = update.catalogue, None
    else:
        if held is None or update.base_version != held.directory.version:
            raise _invalid(
                f"a delta from version {update.base_version} does not apply to the version "
                f"held, {'none' if held is None else held.directory.version}"
            )
        changed = bytearray(held.digests)
        for bucket, digest in update.changed.items():
            if not 0 <= bucket < BUCKETS or len(digest) != DIGEST_BYTES:
                raise _invalid(f"a changed digest for bucket {bucket} is malformed")
            changed[bucket * DIGEST_BYTES : (bucket + 1) * DIGEST_BYTES] = digest
        digests = bytes(changed)
        kept = held.buckets
        catalogue, catalogue_doc = held.catalogue, held.catalogue_doc
        if update.catalogue is not None:
            catalogue, catalogue_doc = update.catalogue, None
    if agreements_root(digests) != directory.agreements_root:
        raise _invalid("the bucket digests do not hash to the directory's agreements root")
    if sha256(catalogue) != directory.catalogue_sha256:
        raise _invalid(
            "the catalogue does not match the directory's digest"
            if update.catalogue is not None
            else "the catalogue changed and the update does not carry it"
        )
    if catalogue_doc is None:
        catalogue_doc = parse_catalogue(catalogue)
    servers = catalogue_doc.get("security_servers", [])
    if not isinstance(servers, list):
        raise _invalid("the catalogue's security_servers is not a list")
    wanted = wanted_buckets((d for d in servers if isinstance(d, dict)), server, subsystems)
    buckets: dict[int, tuple[bytes, tuple[Agreement, ...]]] = {}
    for bucket in sorted(wanted):
        digest = digests[bucket * DIGEST_BYTES : (bucket + 1) * DIGEST_BYTES]
        content = update.buckets.get(bucket)
        if content is not None:
            if sha256(content) != digest:
                raise _invalid(f"bucket {bucket} does not match its digest")
            buckets[bucket] = (content, parse_bucket(content, bucket))
        elif bucket in kept and sha256(kept[bucket][0]) == digest:
            buckets[bucket] = kept[bucket]
        elif digest == EMPTY_DIGEST:
            buckets[bucket] = (EMPTY_BUCKET, ())
        else:
            raise _invalid(f"bucket {bucket}, which this server needs, is missing")
    # a bucket sent and not wanted (the server's subsystems changed meanwhile) is left out
    same = held is not None and catalogue_doc is held.catalogue_doc
    config = assemble_parts(
        directory,
        catalogue_doc,
        [b[1] for b in buckets.values()],
        previous=held.config if same and held is not None else None,
    )
    return Held(
        signed=update.directory,
        directory=directory,
        catalogue=catalogue,
        catalogue_doc=catalogue_doc,
        digests=digests,
        buckets=buckets,
        config=config,
    )
