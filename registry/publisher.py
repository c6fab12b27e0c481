"""Builds, signs, stores and pushes the global configuration.

A new version is published at start-up, every `refresh_seconds`, and whenever the
content changes (`publish` is called); each one is valid for `validity_seconds`. Besides
the catalogue and the agreements it lists every federation (active and ended, with the
other instance's anchor), the instance's policy `outbound_approval_required` and its
approved outbound approvals.

A version is published in parts (gateway/config_parts.py): the book of parts
(registry/parts.py) is built once at start-up; after that, `publish` reads only what
changed since the last version, from the admin log, which names the target of every
change: the agreements among those targets are read again and re-bucketed, and any other
target (a member, server, service, federation, outbound approval) re-reads the catalogue.
Then only the directory is signed. A version so costs O(change), not O(world). Each
version's changed buckets are kept for the last `HISTORY` versions, so that a watcher a
few versions behind gets a delta. The whole configuration in one signed document (format 1,
for the `Fetch` and `Watch` of older servers and tools) is built only when asked for, once
per version.

Several registry processes may share one PostgreSQL database (README, *Registry
replicas*): a version is built under the lock that excludes changes
(`RegistryStore.publishing`), so it covers exactly the admin log entries up to the one it
records; the others take it over as their notifications arrive (`follow`,
`follow_notifications`) when what they read gives the same digests, and refresh only when
no version is recent (`refresh`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog

from gateway import canonical
from gateway.config_parts import BUCKETS, build_directory
from gateway.configuration import (
    FORMAT_VERSION,
    MAX_CONFIGURATION_BYTES,
    SecurityServer,
    SignedConfiguration,
    compress_content,
    sign_configuration,
)
from gateway.signing import Signer
from gateway.timeutil import format_time, parse_time
from registry.metrics import RegistryMetrics, timer
from registry.parts import BucketChange, Buckets, Catalogue, PartsBook, encode_catalogue
from registry.store import CONFIGURATION_CHANNEL, Content, RegistryStore, StoredVersion

log = structlog.get_logger("registry.publisher")

# versions whose changed buckets are remembered, for watchers that fell behind
HISTORY = 1024
NO_CHANGE = BucketChange(where={}, agreements={}, contents={})
# a version another registry process stored this recently, covering what the database holds,
# is served by a process asked to publish (it published the same change first)
PUBLISH_TAKES_OVER = timedelta(seconds=5)


@dataclass(frozen=True, slots=True)
class Version:
    """One published version: its signed directory and what changed since the one before."""

    number: int
    directory: SignedConfiguration
    generated_at: datetime
    expires_at: datetime
    catalogue_sha256: bytes
    # buckets whose digest changed since the version before
    changed: frozenset[int]


class Mode(enum.Enum):
    """Why a version is wanted: publish a new one; publish one unless a recent one can be
    taken over (the periodic refresh); take over another process's newest one (follow)."""

    PUBLISH = "publish"
    REFRESH = "refresh"
    FOLLOW = "follow"


class Publisher:
    def __init__(
        self,
        *,
        store: RegistryStore,
        instance: str,
        signer: Signer,
        ca_certificates: tuple[bytes, ...],
        validity: timedelta,
        clock: Callable[[], datetime],
        outbound_approval_required: bool = False,
        metrics: RegistryMetrics | None = None,
        max_message_bytes: int = MAX_CONFIGURATION_BYTES,
    ) -> None:
        self.metrics = metrics
        # the largest configuration message the configuration service may send
        self.max_message_bytes = max_message_bytes
        self.store = store
        self.instance = instance
        self.signer = signer
        self.ca_certificates = ca_certificates
        self.validity = validity
        self.clock = clock
        self.outbound_approval_required = outbound_approval_required
        self.book = PartsBook()
        self.history: OrderedDict[int, Version] = OrderedDict()
        self.current: Version | None = None
        self.version = 0
        # when the current version stops being valid (readiness and metrics read it)
        self.expires_at: datetime | None = None
        # the admin log entry last read into the book
        self._admin_seq = -1
        # the whole configuration of a version in one document (format 1), when asked for
        self._whole: tuple[int, SignedConfiguration, bytes] | None = None
        self._whole_lock = asyncio.Lock()
        self._changed = asyncio.Condition()
        self._lock = asyncio.Lock()
        # when the first of the published authentication certificates that overlap a
        # renewal expires: the catalogue is then read again to leave it out
        self._certificate_expiry: datetime | None = None

    async def publish(self) -> Version:
        """Publish a new version with what changed since the last one, unless another
        registry process stored one covering the same admin log entry in the last
        PUBLISH_TAKES_OVER (it published this change first): that one is served."""
        version = await self._sync(Mode.PUBLISH)
        assert version is not None
        return version

    async def refresh(self, period: timedelta) -> Version:
        """Publish a new version unless another registry process published one less than
        half of `period` ago that this one can take over (`follow`)."""
        version = await self._sync(Mode.REFRESH, period / 2)
        assert version is not None
        return version

    async def follow(self) -> Version | None:
        """Take over the newest version another registry process stored, when it is newer
        than this one's and the database is still at the admin log entry it covers; publish
        a new version when a change was committed and not yet published (its process may
        have died). None when there was nothing to do or the version cannot be taken over."""
        return await self._sync(Mode.FOLLOW)

    async def _sync(self, mode: Mode, fresh: timedelta = timedelta(0)) -> Version | None:
        async with self._lock:
            elapsed = timer()
            if self.current is None and self._admin_seq < 0:
                # the first reading of the whole database, outside the publishing lock: at
                # national scale it takes seconds, which no change should wait for
                catalogue, buckets, _, seq = await self._read_changes()
                assert buckets is not None
                self.book.catalogue, self.book.buckets, self._admin_seq = catalogue, buckets, seq
            async with self.store.publishing() as slot:
                latest, now = slot.latest, self.clock()
                if slot.head_seq < self._admin_seq:  # the database was restored: read it anew
                    self._admin_seq = -1
                # the newest stored version covers what the database holds now and is recent
                # enough to serve instead of a new one (PUBLISH: another process has just
                # published the change this one was asked to)
                if mode is Mode.PUBLISH:
                    fresh = PUBLISH_TAKES_OVER
                takeable = (
                    latest is not None
                    and latest.generated_at is not None
                    and latest.admin_seq == slot.head_seq
                    and (mode is Mode.FOLLOW or latest.generated_at > now - fresh)
                    and (mode is not Mode.PUBLISH or latest.number > self.version)
                )
                if takeable and latest is not None and latest.number <= self.version:
                    return None if mode is Mode.FOLLOW else self.current
                catalogue, buckets, change, seq = await self._read_changes()
                if buckets is not None:
                    root, changed = buckets.root(), frozenset(range(BUCKETS))
                else:
                    root = self.book.buckets.root_with(change)
                    changed = frozenset(change.contents)
                published = None
                if takeable and latest is not None:
                    published = self._taken_over(latest, catalogue.sha256, root, changed)
                    if published is None and mode is Mode.FOLLOW:
                        return None  # logged; the next refresh publishes
                how = "configuration_taken_over"
                if published is None:
                    how = "configuration_published"
                    number = max(self.version, 0 if latest is None else latest.number) + 1
                    directory = build_directory(
                        instance=self.instance,
                        version=number,
                        generated_at=now,
                        expires_at=now + self.validity,
                        catalogue_sha256=catalogue.sha256,
                        agreements_root=root,
                    )
                    signed = sign_configuration(directory, self.signer)
                    await slot.save(number, signed, admin_seq=seq, generated_at=now)
                    published = Version(
                        number=number,
                        directory=signed,
                        generated_at=now,
                        expires_at=now + self.validity,
                        catalogue_sha256=catalogue.sha256,
                        changed=changed,
                    )
            # the parts, the version and its history change together, with no await in
            # between: a watch stream reads one version's parts in full
            self.book.catalogue = catalogue
            if buckets is not None:
                self.book.buckets = buckets
            else:
                self.book.buckets.apply(change)
            self._admin_seq = seq
            self.history[published.number] = published
            while len(self.history) > HISTORY:
                self.history.popitem(last=False)
            self.version = published.number
            self.current = published
            self.expires_at = published.expires_at
            if self.metrics is not None:
                states = await self.store.agreement_states()
                self.metrics.published(published.number, elapsed(), states)
        async with self._changed:
            self._changed.notify_all()
        log.info(
            how,
            instance=self.instance,
            version=published.number,
            changed_buckets=len(changed),
            seconds=round(elapsed(), 3),
        )
        return published

    def _taken_over(
        self, latest: StoredVersion, catalogue_sha256: bytes, root: bytes, changed: frozenset[int]
    ) -> Version | None:
        """`latest` as this process's version when its content is what this process read
        from the database; else None (logged: the processes' settings may differ)."""
        doc = canonical.decode(latest.signed.content)
        if doc.get("version") != latest.number:  # renumbered by a restore: never served
            return None
        if (
            doc.get("catalogue_sha256") != catalogue_sha256.hex()
            or doc.get("agreements_root") != root.hex()
        ):
            log.error(
                "configuration_not_taken_over",
                version=latest.number,
                reason="its content differs from what this registry process reads from the "
                "database: do the replicas have the same settings (ca_certificates, policy)?",
            )
            return None
        return Version(
            number=latest.number,
            directory=latest.signed,
            generated_at=parse_time(doc["generated_at"]),
            expires_at=parse_time(doc["expires_at"]),
            catalogue_sha256=catalogue_sha256,
            changed=changed,
        )

    async def _read_changes(self) -> tuple[Catalogue, Buckets | None, BucketChange, int]:
        """What changed in the database since the book was last brought up to it: the
        catalogue to publish, all buckets anew (the first time) or the change of some, and
        the admin log entry read up to."""
        if self._admin_seq < 0:  # the first version: everything, in worker threads
            head = await self.store.admin_head()
            content = await self.store.catalogue()
            buckets = Buckets.empty()
            async for page in self.store.published_agreement_pages():
                await asyncio.to_thread(buckets.add, page)
            await asyncio.to_thread(buckets.encode_all)
            catalogue = await asyncio.to_thread(self._encode_catalogue, content)
            return catalogue, buckets, NO_CHANGE, head.next_seq - 1
        targets, seq = await self.store.admin_targets(self._admin_seq)
        catalogue = self.book.catalogue
        # a certificate listed beside its successor expired: the catalogue leaves it out
        expired = self._certificate_expiry is not None and self.clock() >= self._certificate_expiry
        if expired:
            content = await self.store.catalogue()
            catalogue = await asyncio.to_thread(self._encode_catalogue, content)
        if not targets:
            return catalogue, None, NO_CHANGE, seq
        agreements = await self.store.agreements_by_id(targets)
        if targets - agreements.keys() and not expired:
            content = await self.store.catalogue()
            catalogue = await asyncio.to_thread(self._encode_catalogue, content)
        return catalogue, None, self.book.buckets.plan(agreements), seq

    def _encode_catalogue(self, content: Content) -> Catalogue:
        servers, self._certificate_expiry = without_expired_certificates(
            content.servers, self.clock()
        )
        return encode_catalogue(
            dataclasses.replace(content, servers=servers),
            ca_certificates=self.ca_certificates,
            outbound_approval_required=self.outbound_approval_required,
        )

    async def wait_newer(self, version: int) -> Version:
        """Wait until a version newer than `version` is published, and return it."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.version > version)
            assert self.current is not None
            return self.current

    def changed_since(self, version: int) -> frozenset[int] | None:
        """The buckets changed after `version` up to the current one; None when `version`
        is older than the history kept (the watcher then needs a snapshot)."""
        if version not in self.history:
            return None
        changed: set[int] = set()
        for number in reversed(self.history):  # newest first, up to `version`
            if number <= version:
                break
            changed |= self.history[number].changed
        return frozenset(changed)

    async def whole(self) -> tuple[int, SignedConfiguration, bytes]:
        """The current version as one signed document (format 1) and its gzip, built when
        first asked for (in a worker thread: it is O(world))."""
        async with self._whole_lock:
            current = self.current
            assert current is not None
            if self._whole is not None and self._whole[0] == current.number:
                return self._whole
            catalogue = self.book.catalogue.doc
            listed = self.book.buckets.listed()

            def build() -> tuple[SignedConfiguration, bytes]:
                # canonical JSON sorts keys and "agreements" comes first: the agreements'
                # own canonical bytes are joined in, not encoded again
                rest = canonical.encode(
                    {
                        **catalogue,
                        "format": FORMAT_VERSION,
                        "instance": self.instance,
                        "version": current.number,
                        "generated_at": format_time(current.generated_at),
                        "expires_at": format_time(current.expires_at),
                    }
                )
                agreements = b",".join(listed[i] for i in sorted(listed))
                content = b'{"agreements":[' + agreements + b"]," + rest[1:]
                return sign_configuration(content, self.signer), compress_content(content)

            signed, packed = await asyncio.to_thread(build)
            self._whole = (current.number, signed, packed)
            return self._whole


def without_expired_certificates(
    servers: tuple[SecurityServer, ...], now: datetime
) -> tuple[tuple[SecurityServer, ...], datetime | None]:
    """The servers with the expired ones of their authentication certificates left out
    (never the last one), and when the next of those still listed beside another expires."""
    kept: list[SecurityServer] = []
    soonest: datetime | None = None
    for server in servers:
        if not server.next_auth_certificates:
            kept.append(server)
            continue
        valid = [
            (der, cert.not_valid_after_utc)
            for der, cert in zip(server.auth_certificates, server.auth_x509s, strict=True)
            if cert.not_valid_after_utc > now
        ] or [(server.auth_certificates[-1], server.auth_x509s[-1].not_valid_after_utc)]
        if len(valid) > 1:
            first = min(until for _, until in valid)
            soonest = first if soonest is None else min(soonest, first)
        ders = [der for der, _ in valid]
        kept.append(
            dataclasses.replace(
                server, auth_certificate=ders[0], next_auth_certificates=tuple(ders[1:])
            )
        )
    return tuple(kept), soonest


async def follow_notifications(publisher: Publisher, *, retry_seconds: float = 1.0) -> None:
    """Take over the versions other registry processes publish on the same PostgreSQL
    database, as their notifications arrive (runs until cancelled).

    The listening connection is opened apart from the store's pool. When it is lost (a
    database restart), it is opened again every `retry_seconds`, and the newest version is
    taken over at once, since notifications sent in between are lost. A refresh every
    `refresh_seconds` bounds what a missed notification can delay.
    """
    import asyncpg  # PostgreSQL only

    url = publisher.store.engine.url.set(drivername="postgresql")
    dsn = url.render_as_string(hide_password=False)
    # notification payloads; None when the listening connection closed
    queue: asyncio.Queue[str | None] = asyncio.Queue()
    while True:
        connection: asyncpg.Connection | None = None
        try:
            while not queue.empty():  # left from a lost connection
                queue.get_nowait()
            connection = await asyncpg.connect(dsn, timeout=10)
            connection.add_termination_listener(lambda _: queue.put_nowait(None))
            await connection.add_listener(
                CONFIGURATION_CHANNEL, lambda _c, _pid, _channel, payload: queue.put_nowait(payload)
            )
            await publisher.follow()  # what was published while not listening
            while True:
                payload = await queue.get()
                if payload is None:
                    raise ConnectionError("the listening connection was closed")
                newest = int(payload)
                while not queue.empty():  # a burst of versions: take the newest once
                    more = queue.get_nowait()
                    if more is None:
                        raise ConnectionError("the listening connection was closed")
                    newest = max(newest, int(more))
                if newest > publisher.version:
                    await publisher.follow()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # whatever a lost database shows
            log.warning(
                "configuration_notifications_lost", error=str(exc)[:300], retry=retry_seconds
            )
            await asyncio.sleep(retry_seconds)
        finally:
            if connection is not None and not connection.is_closed():
                connection.terminate()
