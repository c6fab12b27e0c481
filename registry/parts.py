"""The registry's current configuration parts, kept encoded between versions.

`PartsBook` holds the catalogue part and the `BUCKETS` agreement buckets (see
gateway/config_parts.py) as canonical bytes with their digests, and which buckets list each
agreement. A change of some agreements re-encodes only the buckets they are in (at most
two each), a catalogue change only the catalogue; the digests of all buckets are kept in
one array, whose SHA-256 the directory signs. Each bucket and the catalogue are gzipped
once per content, for every watcher.

The book is changed only on the registry's event loop (what takes long, encoding every
bucket at start-up or the catalogue, is computed in a worker thread and then swapped in),
so that a watch stream reads one version's parts in full.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from gateway import canonical
from gateway.agreements import Agreement
from gateway.config_parts import (
    BUCKETS,
    DIGEST_BYTES,
    EMPTY_BUCKET,
    EMPTY_DIGEST,
    bucket_of,
    buckets_of,
    sha256,
)
from gateway.configuration import catalogue_json, compress_content
from registry.store import Content


@dataclass(frozen=True, slots=True)
class Catalogue:
    """An encoded catalogue part: its bytes, digest, decoded form and who hosts what."""

    content: bytes
    sha256: bytes
    doc: Mapping[str, Any]
    # server id -> the subsystems it hosts
    hosted: Mapping[str, tuple[str, ...]]


def encode_catalogue(
    content: Content, *, ca_certificates: tuple[bytes, ...], outbound_approval_required: bool
) -> Catalogue:
    doc = catalogue_json(
        ca_certificates=ca_certificates,
        members=content.members,
        servers=content.servers,
        services=content.services,
        federations=content.federations,
        outbound_approval_required=outbound_approval_required,
        outbound_approvals=content.outbound_approvals,
    )
    data = canonical.encode(doc)
    hosted = {str(s.id): tuple(str(x) for x in s.subsystems) for s in content.servers}
    return Catalogue(content=data, sha256=sha256(data), doc=doc, hosted=hosted)


EMPTY_CATALOGUE = Catalogue(content=b"", sha256=b"", doc={}, hosted={})


def agreement_bytes(agreement: Agreement) -> bytes:
    """An agreement's canonical JSON, as buckets list it."""
    return canonical.encode(agreement.to_json())


def join_bucket(listed: Mapping[str, bytes]) -> bytes:
    """A bucket's canonical content from its agreements' canonical JSON: the same bytes as
    `encode_bucket` gives (canonical JSON is compact, with keys and here ids in order)."""
    return b'{"agreements":[' + b",".join(listed[i] for i in sorted(listed)) + b"]}"


@dataclass(frozen=True, slots=True)
class BucketChange:
    """A change of some agreements, planned: their new buckets (empty: removed), the new
    listing of every bucket they touch, and the new content of those that changed."""

    where: Mapping[str, frozenset[int]]
    agreements: Mapping[int, dict[str, bytes]]
    # bucket -> (new content, its SHA-256), for the buckets whose content changed
    contents: Mapping[int, tuple[bytes, bytes]]


@dataclass(slots=True)
class Buckets:
    """Every agreement bucket: its agreements (id -> canonical JSON, one bytes object shared
    by an agreement's two buckets, so 100,000 agreements take tens of MB, not the hundreds
    their parsed form would), content and digest."""

    agreements: list[dict[str, bytes]]
    contents: list[bytes]
    digests: bytearray
    where: dict[str, frozenset[int]]

    @classmethod
    def empty(cls) -> Buckets:
        return cls(
            agreements=[{} for _ in range(BUCKETS)],
            contents=[EMPTY_BUCKET] * BUCKETS,
            digests=bytearray(EMPTY_DIGEST * BUCKETS),
            where={},
        )

    @classmethod
    def of(cls, agreements: Iterable[Agreement]) -> Buckets:
        """All buckets built from scratch."""
        book = cls.empty()
        book.add(agreements)
        book.encode_all()
        return book

    def add(self, agreements: Iterable[Agreement]) -> None:
        """List agreements in their buckets without encoding them (`encode_all` does)."""
        for a in agreements:
            where = buckets_of(a)
            self.where[a.id] = where
            data = agreement_bytes(a)
            for b in where:
                self.agreements[b][a.id] = data

    def encode_all(self) -> None:
        for b in range(BUCKETS):
            if self.agreements[b]:
                self._encode(b)

    def _encode(self, bucket: int) -> None:
        content = join_bucket(self.agreements[bucket])
        self.contents[bucket] = content
        self.digests[bucket * DIGEST_BYTES : (bucket + 1) * DIGEST_BYTES] = sha256(content)

    def plan(self, changed: Mapping[str, Agreement | None]) -> BucketChange:
        """What putting each agreement of `changed` in its buckets (None: taking it out)
        would change, computed without changing anything (`apply` does)."""
        where: dict[str, frozenset[int]] = {}
        touched: dict[int, dict[str, bytes]] = {}
        for agreement_id, agreement in changed.items():
            for b in self.where.get(agreement_id, frozenset()):
                touched.setdefault(b, dict(self.agreements[b])).pop(agreement_id, None)
            where[agreement_id] = frozenset()
            if agreement is not None:
                where[agreement_id] = buckets_of(agreement)
                data = agreement_bytes(agreement)
                for b in where[agreement_id]:
                    touched.setdefault(b, dict(self.agreements[b]))[agreement_id] = data
        contents: dict[int, tuple[bytes, bytes]] = {}
        for b, listed in touched.items():
            content = join_bucket(listed)
            digest = sha256(content)
            if digest != self.digest(b):
                contents[b] = (content, digest)
        return BucketChange(where=where, agreements=touched, contents=contents)

    def root_with(self, change: BucketChange) -> bytes:
        """The agreements root once `change` is applied."""
        digests = bytearray(self.digests)
        for b, (_, digest) in change.contents.items():
            digests[b * DIGEST_BYTES : (b + 1) * DIGEST_BYTES] = digest
        return sha256(bytes(digests))

    def apply(self, change: BucketChange) -> None:
        for agreement_id, where in change.where.items():
            if where:
                self.where[agreement_id] = where
            else:
                self.where.pop(agreement_id, None)
        for b, listed in change.agreements.items():
            self.agreements[b] = listed
        for b, (content, digest) in change.contents.items():
            self.contents[b] = content
            self.digests[b * DIGEST_BYTES : (b + 1) * DIGEST_BYTES] = digest

    def root(self) -> bytes:
        return sha256(bytes(self.digests))

    def digest(self, bucket: int) -> bytes:
        return bytes(self.digests[bucket * DIGEST_BYTES : (bucket + 1) * DIGEST_BYTES])

    def listed(self) -> dict[str, bytes]:
        """Every agreement's canonical JSON, by id."""
        unique: dict[str, bytes] = {}
        for bucket in self.agreements:
            unique.update(bucket)
        return unique


class PartsBook:
    """The current catalogue and buckets, and their compressed forms."""

    def __init__(self) -> None:
        self.catalogue = EMPTY_CATALOGUE
        self.buckets = Buckets.empty()
        self._gzip: dict[bytes, bytes] = {}

    def gzip(self, content: bytes, digest: bytes) -> bytes:
        """`content` (whose SHA-256 is `digest`: the book keeps each part's) gzipped, once
        per distinct content, for every watcher."""
        packed = self._gzip.get(digest)
        if packed is None:
            if len(self._gzip) > 4 * BUCKETS:
                self._gzip.clear()
            packed = self._gzip[digest] = compress_content(content)
        return packed

    def wanted(self, server: str, subsystems: Iterable[str]) -> frozenset[int]:
        """The buckets of what `server` hosts (by the current catalogue) and of `subsystems`."""
        return frozenset(
            bucket_of(s) for s in (*self.catalogue.hosted.get(server, ()), *subsystems)
        )
