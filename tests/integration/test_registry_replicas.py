"""Several registry processes over one PostgreSQL database (issue 17).

In process, two stores and two publishers stand for two registries: every version number
is published once whichever process publishes, a process takes over the versions the
other publishes (as its notifications arrive), a change committed by a process that died
before publishing is published by the other, and processes whose settings differ do not
answer each other's versions with new ones forever. Then two real `gateway registry serve`
processes take concurrent changes through both admin APIs while watch streams follow
both; one is killed and the other goes on; the restarted one continues the sequence.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from certs.pki import init_pki
from gateway.config_parts import verify_directory
from gateway.configuration import Anchor, SignedConfiguration
from gateway.identifiers import MemberId
from gateway.signing import EcdsaSigner, load_certificate, load_private_key
from gateway.v1 import configuration_pb2 as pb
from gateway.workflow import Policy
from gateway_demo.runner import Runner
from gateway_ops.auth import Principal, Role
from registry.governance import Governance
from registry.publisher import Publisher, Version, follow_notifications
from registry.store import RegistryStore
from tests.integration.conftest import close_database, postgres_database, reopen_database

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(
        not os.environ.get("GATEWAY_TEST_POSTGRES_URL"),
        reason="GATEWAY_TEST_POSTGRES_URL is not set: registry replicas need PostgreSQL",
    ),
]

ADMIN = Principal(
    subject="alice@registry", role=Role.REGISTRY_ADMIN, member=None, server=None, issuer="test"
)


# ---- two registries in one process ---------------------------------------------------------


@dataclass
class Replica:
    """One registry process's store, publisher and governance, and the versions a watcher
    of its configuration service saw."""

    store: RegistryStore
    publisher: Publisher
    gov: Governance
    seen: list[Version] = field(default_factory=list)


@pytest.fixture(scope="module")
def signer(tmp_path_factory: pytest.TempPathFactory) -> EcdsaSigner:
    pki = tmp_path_factory.mktemp("pki")
    init_pki(
        pki,
        instance="UY",
        members=[MemberId.parse("UY/GOV/DNIC")],
        servers=[],
        registry_addresses=["127.0.0.1:7000"],
        now=datetime.now(UTC),
    )
    return EcdsaSigner(
        load_private_key((pki / "configuration-signing.key").read_bytes()),
        load_certificate((pki / "configuration-signing.crt").read_bytes()),
    )


@pytest.fixture
def database() -> Iterator[tuple[str, str]]:
    """A new PostgreSQL database of the test's own (created outside the test's event loop),
    as (name, URL)."""
    with postgres_database("registry_replicas") as created:
        yield created


@pytest.fixture
def url(database: tuple[str, str]) -> str:
    return database[1]


@asynccontextmanager
async def replicas(
    url: str, signer: EcdsaSigner, *, outbound: tuple[bool, bool] = (False, False)
) -> AsyncIterator[tuple[Replica, Replica]]:
    """Two registries on one database, each following the other's notifications, each
    with a watcher recording the versions it is given."""
    made: list[Replica] = []
    tasks: list[asyncio.Task[Any]] = []
    try:
        for required in outbound:
            store = await RegistryStore.open(url)
            publisher = Publisher(
                store=store,
                instance="UY",
                signer=signer,
                ca_certificates=(),
                validity=timedelta(minutes=10),
                clock=lambda: datetime.now(UTC),
                outbound_approval_required=required,
            )
            gov = Governance(
                store,
                instance="UY",
                policy=Policy(),
                clock=lambda: datetime.now(UTC),
                on_change=publisher.publish,
            )
            made.append(Replica(store, publisher, gov))
        await made[0].publisher.publish()
        for replica in made:
            tasks.append(asyncio.create_task(follow_notifications(replica.publisher)))
            tasks.append(asyncio.create_task(watcher(replica)))
        await asyncio.sleep(0.3)  # both listening
        yield made[0], made[1]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for replica in made:
            await replica.store.close()


async def watcher(replica: Replica) -> None:
    """What a Watch stream does: wait for a newer version, take the current one."""
    known = 0
    while True:
        version = await replica.publisher.wait_newer(known)
        replica.seen.append(version)
        known = version.number


async def settled(one: Replica, two: Replica, timeout: float = 10.0) -> int:
    """Wait until both publishers serve the newest stored version; its number."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        newest = await one.store.last_version()
        if one.publisher.version == two.publisher.version == newest:
            await asyncio.sleep(0.05)  # the watchers' turn
            return newest
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(
                f"not settled: stored {newest}, served {one.publisher.version} and "
                f"{two.publisher.version}"
            )
        await asyncio.sleep(0.02)


def one_sequence(*replicas: Replica) -> list[int]:
    """Every version any process served, checked to be one sequence: a number always names
    the same signed directory, the numbers have no gap, and each watcher's only go up."""
    by_number: dict[int, bytes] = {}
    for replica in replicas:
        for version in replica.publisher.history.values():
            content = by_number.setdefault(version.number, version.directory.content)
            assert content == version.directory.content, f"version {version.number} twice"
        numbers = [v.number for v in replica.seen]
        assert numbers == sorted(set(numbers)), f"a watcher went back or repeated: {numbers}"
    numbers = sorted(by_number)
    assert numbers == list(range(numbers[0], numbers[-1] + 1)), f"a gap: {numbers}"
    return numbers


def members_of(replica: Replica) -> set[str]:
    return {m["id"] for m in replica.publisher.book.catalogue.doc["members"]}


async def test_concurrent_changes_through_two_registries_make_one_version_sequence(
    signer: EcdsaSigner, url: str
) -> None:
    async with replicas(url, signer) as (one, two):
        added = [f"UY/GOV/M{i:02d}" for i in range(30)]
        await asyncio.gather(
            *(
                (one if i % 2 else two).gov.add_member(ADMIN, MemberId.parse(m), m)
                for i, m in enumerate(added)
            )
        )
        newest = await settled(one, two)
        numbers = one_sequence(one, two)
        assert numbers[-1] == newest
        for replica in (one, two):
            assert set(added) <= members_of(replica)
            assert replica.seen[-1].number == newest
            assert replica.seen[-1].directory == one.seen[-1].directory
        for replica in (one, two):
            verdict = await replica.gov.verify_admin_log(ADMIN)
            assert verdict["verified"] is True


async def test_a_change_its_registry_died_before_publishing_is_published_by_the_other(
    signer: EcdsaSigner, url: str
) -> None:
    """The change commits, its process dies before publishing: the other process's next
    follow (a notification, a reconnection or its refresh) publishes it."""
    async with replicas(url, signer) as (one, two):
        before = await settled(one, two)

        async def died() -> None:
            return None

        one.gov.on_change = died
        await one.gov.add_member(ADMIN, MemberId.parse("UY/GOV/ORPHAN"), "orphan")
        assert await one.store.last_version() == before  # nothing published
        version = await two.publisher.follow()
        assert version is not None and version.number == before + 1
        await settled(one, two)
        assert "UY/GOV/ORPHAN" in members_of(one) and "UY/GOV/ORPHAN" in members_of(two)
        one_sequence(one, two)


async def test_a_refresh_takes_over_a_recent_version_instead_of_publishing(
    signer: EcdsaSigner, url: str
) -> None:
    """Each process refreshes every refresh_seconds; a version another one published less
    than half of that ago is served as it is, so replicas do not multiply versions."""
    async with replicas(url, signer) as (one, two):
        before = await settled(one, two)
        assert (await two.publisher.refresh(timedelta(minutes=1))).number == before
        assert (await two.publisher.refresh(timedelta(0))).number == before + 1


async def test_registries_with_different_settings_do_not_answer_each_other_forever(
    signer: EcdsaSigner, url: str
) -> None:
    """A process whose own reading of the database differs from a version (here its
    outbound approval policy) logs that it cannot take it over and keeps its own; it does
    not publish in answer, which the other would answer in turn."""
    async with replicas(url, signer, outbound=(False, True)) as (one, two):
        await asyncio.sleep(0.3)
        stored = await one.store.last_version()
        await one.gov.add_member(ADMIN, MemberId.parse("UY/GOV/X"), "x")
        await asyncio.sleep(0.5)
        assert await one.store.last_version() == stored + 1  # one version, not a storm
        assert two.publisher.version < stored + 1


# ---- two registry processes ------------------------------------------------------------------


@dataclass
class Watch:
    """A WatchParts stream on one registry process: the versions and catalogue it got."""

    address: str
    anchor: Anchor
    versions: list[int] = field(default_factory=list)
    directories: dict[int, bytes] = field(default_factory=dict)
    members: set[str] = field(default_factory=set)
    error: str = ""

    async def run(self) -> None:
        try:
            async with grpc.aio.insecure_channel(self.address) as channel:
                call = channel.unary_stream(
                    "/gateway.v1.Configuration/WatchParts",
                    request_serializer=pb.WatchPartsRequest.SerializeToString,
                    response_deserializer=pb.PartsUpdate.FromString,
                )
                async for update in call(pb.WatchPartsRequest(instance="UY")):
                    signed = SignedConfiguration(
                        content=update.directory.content,
                        signature=update.directory.signature,
                        signer_certificate=update.directory.signer_certificate,
                    )
                    directory = verify_directory(signed, self.anchor)
                    self.versions.append(directory.version)
                    self.directories[directory.version] = signed.content
                    if update.catalogue_gzip:
                        doc = json.loads(gzip.decompress(update.catalogue_gzip))
                        self.members = {m["id"] for m in doc["members"]}
        except grpc.aio.AioRpcError as exc:
            self.error = exc.code().name


async def wait_until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def published_versions(runner: Runner, name: str) -> list[int]:
    """The versions a registry process logged as published by itself."""
    versions = []
    for line in runner.processes[name].log_path.read_text().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("event") == "configuration_published":
                versions.append(int(entry["version"]))
    return versions


async def add_member(
    session: aiohttp.ClientSession, api: str, token: str, member: str
) -> tuple[int, dict[str, Any]]:
    async with session.post(
        f"http://{api}/v1/members",
        json={"id": member, "name": member},
        headers={"Authorization": f"Bearer {token}"},
    ) as response:
        return response.status, await response.json()


async def add_members(session: aiohttp.ClientSession, api: str, token: str, ids: list[str]) -> None:
    async def add(member: str) -> None:
        status, body = await add_member(session, api, token, member)
        assert status == 201, body

    await asyncio.gather(*(add(m) for m in ids))


@pytest.mark.slow
async def test_two_registry_processes_database_restart_one_killed(
    tmp_path: Path, database: tuple[str, str]
) -> None:
    """Two `gateway registry serve` processes on one database: changes through both APIs
    at once (one token, accepted by both) reach every watcher of either in one version
    sequence, and the admin log verifies; their database restarted, both refuse changes
    with 503 meanwhile and take them again by themselves after, each still hearing the
    other's versions; with one killed, the other goes on publishing; restarted, it
    continues the sequence."""
    name, url = database
    runner = Runner(tmp_path / "run", registry_replicas=2, registry_database=url)
    runner.prepare()
    try:
        for process in runner.registries:  # started together: one migration, one seed
            runner.launch(process)
        for process in runner.registries:
            await asyncio.to_thread(runner.wait_ready, process)
        anchor = Anchor.from_json(json.loads((runner.pki / "anchor.json").read_text()))
        assert len(anchor.addresses) == 2
        (listen_1, api_1), (listen_2, api_2) = runner.registries.values()
        watches = [Watch(a, anchor) for a in (listen_1, listen_1, listen_2, listen_2)]
        tasks = [asyncio.create_task(w.run()) for w in watches]
        await wait_until(lambda: all(w.versions for w in watches), "the first versions")
        token = runner.token("registry-admin")
        first = [f"UY/GOV/A{i:02d}" for i in range(12)]
        second = [f"UY/GOV/B{i:02d}" for i in range(12)]
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(
                add_members(session, api_1, token, first),
                add_members(session, api_2, token, second),
            )
            await wait_until(
                lambda: all(set(first + second) <= w.members for w in watches),
                "every watcher to hold every change",
            )
            await wait_until(
                lambda: len({w.versions[-1] for w in watches}) == 1, "one newest version"
            )
            one = published_versions(runner, "registry")
            two = published_versions(runner, "registry-2")
            assert not set(one) & set(two), f"published by both: {set(one) & set(two)}"
            by_number: dict[int, bytes] = {}
            for w in watches:
                assert w.versions == sorted(set(w.versions)), w.versions
                for number, content in w.directories.items():
                    assert by_number.setdefault(number, content) == content
            for api in (api_1, api_2):
                async with session.get(
                    f"http://{api}/v1/admin-log/verify",
                    headers={"Authorization": f"Bearer {token}"},
                ) as response:
                    verdict = await response.json()
                assert verdict["verified"] is True, verdict

            # the database restarts: changes are refused meanwhile, then taken again,
            # and each registry hears the other's versions again (its listener came back)
            await close_database(name)
            status, body = await add_member(session, api_1, token, "UY/GOV/DURING")
            assert (status, body["error"]) == (503, "database_unavailable"), body
            await asyncio.sleep(2)
            await reopen_database(name)
            outage = asyncio.get_running_loop().time()
            after = {api_1: "UY/GOV/AFTER1", api_2: "UY/GOV/AFTER2"}
            for api, member in after.items():
                while (await add_member(session, api, token, member))[0] != 201:
                    assert asyncio.get_running_loop().time() < outage + 15, "no recovery"
                    await asyncio.sleep(0.2)
            await wait_until(
                lambda: all(set(after.values()) <= w.members for w in watches),
                "every watcher to get the changes made after the restart",
            )
            recovered = asyncio.get_running_loop().time() - outage
            assert not any("UY/GOV/DURING" in w.members for w in watches)

            # one registry killed: the other takes the changes and publishes them
            runner.stop("registry", kill=True)
            last = max(w.versions[-1] for w in watches)
            await wait_until(lambda: all(w.error for w in watches[:2]), "the streams end")
            third = [f"UY/GOV/C{i:02d}" for i in range(4)]
            await add_members(session, api_2, token, third)
            await wait_until(
                lambda: all(set(third) <= w.members for w in watches[2:]),
                "the survivor's watchers to get the changes",
            )
            assert all(w.versions[-1] > last for w in watches[2:])

            # restarted, it serves the newest version (or a newer one, never an older
            # number) and continues the sequence with the next change made through it
            survivor = watches[2].versions[-1]
            await asyncio.to_thread(runner.start, "registry")
            again = Watch(listen_1, anchor)
            tasks.append(asyncio.create_task(again.run()))
            await wait_until(lambda: bool(again.versions), "the restarted one's version")
            assert again.versions[0] >= survivor
            assert set(first + second + third) <= again.members
            await add_members(session, api_1, token, ["UY/GOV/D00"])
            await wait_until(
                lambda: all("UY/GOV/D00" in w.members for w in (again, *watches[2:])),
                "the change through the restarted registry",
            )
            assert again.versions[-1] == watches[2].versions[-1] > again.versions[0]
            print(
                f"\nregistry replicas: {len(first) + len(second)} concurrent changes, "
                f"versions {watches[0].versions[0]}..{watches[2].versions[-1]}, published "
                f"by the first {len(one)}, by the second {len(two)}; database restart: "
                f"both took changes again and heard each other {recovered:.1f} s after"
            )
        for task in tasks:
            task.cancel()
    finally:
        runner.close()
