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
    encode_bucket,
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


@dataclass(frozen=True, slots=True)
class BucketChange:
    """A change of some agreements, planned: their new buckets (empty: removed), the new
    agreements of every bucket they touch, and the new content of those that changed."""

    where: Mapping[str, frozenset[int]]
    agreements: Mapping[int, dict[str, Agreement]]
    contents: Mapping[int, bytes]


@dataclass(slots=True)
class Buckets:
    """Every agreement bucket: agreements by id, content and digest."""

    agreements: list[dict[str, Agreement]]
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
        """All buckets built from scratch (seconds for 100,000 agreements: a worker thread)."""
        book = cls.empty()
        for a in agreements:
            where = buckets_of(a)
            book.where[a.id] = where
            for b in where:
                book.agreements[b][a.id] = a
        for b in range(BUCKETS):
            if book.agreements[b]:
                book._encode(b)
        return book

    def _encode(self, bucket: int) -> None:
        content = encode_bucket(self.agreements[bucket].values())
        self.contents[bucket] = content
        self.digests[bucket * DIGEST_BYTES : (bucket + 1) * DIGEST_BYTES] = sha256(content)

    def plan(self, changed: Mapping[str, Agreement | None]) -> BucketChange:
        """What putting each agreement of `changed` in its buckets (None: taking it out)
        would change, computed without changing anything (`apply` does)."""
        where: dict[str, frozenset[int]] = {}
        touched: dict[int, dict[str, Agreement]] = {}
        for agreement_id, agreement in changed.items():
            for b in self.where.get(agreement_id, frozenset()):
                touched.setdefault(b, dict(self.agreements[b])).pop(agreement_id, None)
            where[agreement_id] = frozenset()
            if agreement is not None:
                where[agreement_id] = buckets_of(agreement)
                for b in where[agreement_id]:
                    touched.setdefault(b, dict(self.agreements[b]))[agreement_id] = agreement
        contents: dict[int, bytes] = {}
        for b, listed in touched.items():
            content = encode_bucket(listed.values())
            if sha256(content) != self.digest(b):
                contents[b] = content
        return BucketChange(where=where, agreements=touched, contents=contents)

    def root_with(self, change: BucketChange) -> bytes:
        """The agreements root once `change` is applied."""
        digests = bytearray(self.digests)
        for b, content in change.contents.items():
            digests[b * DIGEST_BYTES : (b + 1) * DIGEST_BYTES] = sha256(content)
        return sha256(bytes(digests))

    def apply(self, change: BucketChange) -> None:
        for agreement_id, where in change.where.items():
            if where:
                self.where[agreement_id] = where
            else:
                self.where.pop(agreement_id, None)
        for b, listed in change.agreements.items():
            self.agreements[b] = listed
        for b, content in change.contents.items():
            self.contents[b] = content
            self.digests[b * DIGEST_BYTES : (b + 1) * DIGEST_BYTES] = sha256(content)

    def root(self) -> bytes:
        return sha256(bytes(self.digests))

    def digest(self, bucket: int) -> bytes:
        return bytes(self.digests[bucket * DIGEST_BYTES : (bucket + 1) * DIGEST_BYTES])

    def all(self) -> list[Agreement]:
        unique: dict[str, Agreement] = {}
        for bucket in self.agreements:
            unique.update(bucket)
        return list(unique.values())


class PartsBook:
    """The current catalogue and buckets, and their compressed forms."""

    def __init__(self) -> None:
        self.catalogue = EMPTY_CATALOGUE
        self.buckets = Buckets.empty()
        self._gzip: dict[bytes, bytes] = {}

    def gzip(self, content: bytes) -> bytes:
        """`content` gzipped, once per distinct content (the catalogue and the buckets)."""
        digest = sha256(content)
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
