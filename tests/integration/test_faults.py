"""Faults with real processes: backends, peers and the registry stopped, killed and restarted.

The tests that need no settings of their own share one topology (`shared`), each leaving
it running as it found it; the last of them backs the registry and a server up, wipes
them and restores them."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
import tomllib
import urllib.request
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from gateway_demo.client import Outcome, call_raw, routing_metadata
from gateway_demo.generated import population_pb2 as population
from gateway_demo.runner import Runner
from gateway_ops.backupfile import load_key
from security_server.backup import restore

from .clinics import get_person
from .conftest import (
    CLINICS,
    DNIC,
    GET_PERSON,
    MSP,
    POPULATION,
    audit_verify,
    log_rows,
    query_log,
)

PERSON = population.GetPersonRequest(national_id="1.234.567-8").SerializeToString()


async def person(runner: Runner, message_id: str | None = None) -> Outcome:
    async with grpc.aio.insecure_channel(runner.consumers[MSP]) as channel:
        return await call_raw(
            channel,
            GET_PERSON,
            PERSON,
            routing_metadata(
                client=CLINICS,
                service=POPULATION,
                purpose="healthcare-identification",
                message_id=message_id,
            ),
        )


async def until(predicate: Callable[[Outcome], bool], runner: Runner, seconds: float) -> Outcome:
    """Call repeatedly until an outcome satisfies the predicate (or fail after `seconds`)."""
    deadline = time.monotonic() + seconds
    while True:
        outcome = await person(runner)
        if predicate(outcome) or time.monotonic() > deadline:
            return outcome
        await asyncio.sleep(0.2)


@pytest.fixture(scope="module")
def shared(make_runner: Callable[..., Runner]) -> Runner:
    """The demo topology, shared by the tests below that restore what they stop (the
    population backend among them, in a process of its own)."""
    return make_runner(separate_backends=True)


async def test_backend_down_gives_unavailable_and_is_logged(shared: Runner) -> None:
    """With the provider's backend stopped, the call fails UNAVAILABLE/backend_unavailable, logged on both sides."""
    runner = shared
    assert (await person(runner)).ok
    runner.stop("backend-population")
    message_id = uuid.uuid4().hex
    outcome = await person(runner, message_id)
    assert (outcome.code, outcome.error) == (grpc.StatusCode.UNAVAILABLE, "backend_unavailable")
    provider = log_rows(runner.log_db(DNIC), message_id)
    assert [(r["kind"], r["error_code"]) for r in provider] == [
        ("request", None),
        ("response", "backend_unavailable"),
    ]
    consumer = log_rows(runner.log_db(MSP), message_id)
    assert [(r["kind"], r["error_code"]) for r in consumer] == [
        ("request", None),
        ("refusal", "backend_unavailable"),
    ]
    runner.start("backend-population")
    assert (await until(lambda o: o.ok, runner, 10)).ok


async def test_provider_server_down_then_back(shared: Runner) -> None:
    """With the provider's security server down the call fails provider_unavailable; it resumes after restart."""
    runner = shared
    assert (await person(runner)).ok
    runner.stop("ss-dnic", kill=True)
    outcome = await person(runner)
    assert (outcome.code, outcome.error) == (grpc.StatusCode.UNAVAILABLE, "provider_unavailable")
    assert (
        log_rows(runner.log_db(MSP), outcome.message_id or "")[-1]["error_code"]
        == "provider_unavailable"
    )
    runner.start("ss-dnic")
    assert (await until(lambda o: o.ok, runner, 10)).ok


async def test_registry_down_cached_then_expired_then_resumes(
    make_runner: Callable[..., Runner],
) -> None:
    """Registry down: calls go on from the cache, are refused once it expires, and resume when it returns."""
    runner = make_runner(validity_seconds=4.0, refresh_seconds=1.0)
    assert (await person(runner)).ok
    runner.stop("registry", kill=True)
    assert (await person(runner)).ok  # served from the last good configuration
    expired = await until(lambda o: o.error == "configuration_expired", runner, 15)
    assert (expired.code, expired.error) == (grpc.StatusCode.UNAVAILABLE, "configuration_expired")
    assert "expired" in expired.details
    runner.start("registry")
    assert (await until(lambda o: o.ok, runner, 15)).ok  # no restart of the security servers


async def test_server_restarts_from_cached_configuration_while_registry_is_down(
    shared: Runner,
) -> None:
    """A security server restarted while the registry is down starts from its configuration on disk."""
    runner = shared
    assert (await person(runner)).ok
    runner.stop("registry", kill=True)
    runner.stop("ss-msp")
    runner.start("ss-msp")
    assert (await person(runner)).ok
    runner.start("registry")


async def test_provider_killed_under_load_loses_nothing(shared: Runner) -> None:
    """Killing the provider mid-load leaves both logs verifiable, and every answered call logged by it."""
    runner = shared
    stop, enough = asyncio.Event(), asyncio.Event()
    answered: list[str] = []

    async def worker() -> None:
        while not stop.is_set():
            outcome = await person(runner)
            if outcome.ok and outcome.message_id:
                answered.append(outcome.message_id)
                if len(answered) >= 30:
                    enough.set()

    workers = [asyncio.create_task(worker()) for _ in range(8)]
    await asyncio.wait_for(enough.wait(), timeout=30)
    runner.stop("ss-dnic", kill=True)
    await asyncio.sleep(0.5)
    stop.set()
    await asyncio.gather(*workers)
    runner.start("ss-dnic")
    for server in (MSP, DNIC):
        result = audit_verify(runner.log_db(server))
        assert result.returncode == 0, result.stdout + result.stderr
    for message_id in answered:
        kinds = [r["kind"] for r in log_rows(runner.log_db(DNIC), message_id)]
        assert kinds == ["request", "response"], message_id


async def test_calls_over_the_concurrency_limit_are_refused_with_a_code(
    make_runner: Callable[..., Runner],
) -> None:
    """Calls beyond limits.max_concurrent_calls get `overloaded`, a message id and a log record."""
    runner = make_runner(limits={"max_concurrent_calls": 2})
    outcomes = await asyncio.gather(*(person(runner) for _ in range(40)))
    refused = [o for o in outcomes if not o.ok]
    assert any(o.ok for o in outcomes)
    assert refused, "40 concurrent calls never exceeded a limit of 2"
    assert {(o.code, o.error) for o in refused} == {
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "overloaded")
    }
    rows = log_rows(runner.log_db(MSP), refused[0].message_id or "")
    assert [(r["kind"], r["error_code"]) for r in rows] == [("refusal", "overloaded")]


# ---- backup, wipe, restore (the last user of the shared topology) ----------------------


def chain_head(db: Path) -> tuple[int, bytes]:
    (row,) = query_log(db, "SELECT seq, hash FROM message_log ORDER BY seq DESC LIMIT 1")
    return int(row["seq"]), bytes(row["hash"])


async def answered(runner: Runner, calls: int) -> int:
    """How many of `calls` GetPerson calls through ss-msp are answered."""
    async with runner.consumer_channel(MSP) as channel:
        outcomes = [await get_person(channel) for _ in range(calls)]
    return sum(o.ok for o in outcomes)


def gateway_at_once(*commands: list[str | Path]) -> list[str]:
    """Run `gateway` commands side by side, as an operator's script would; their outputs
    (each must succeed)."""
    running = [
        subprocess.Popen(
            [sys.executable, "-m", "gateway_cli.main", *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in commands
    ]
    outputs = []
    for process in running:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, f"{process.args!r}: {err}"
        outputs.append(out)
    return outputs


def test_backup_wipe_restore_and_resume(shared: Runner, tmp_path: Path) -> None:
    """Backup, wipe, restore (issue 17): the registry and the population registry's
    security server are backed up while they run (`gateway registry backup`, `gateway
    server backup`), then lost with their machine (killed; the registry's database, the
    server's settings, keys, state folder and SQLite log wiped), restored (`restore`) and
    started again. They resume: the clinics' calls are answered, the server's log chain
    goes on from the record the backup ended at and verifies, the admin log verifies, and
    the configuration's versions go on past the last one."""
    runner = shared
    server = runner.server_names[DNIC]
    assert asyncio.run(answered(runner, 5)) == 5
    log_db = runner.log_db(DNIC)
    settings_file = runner.workdir / f"{server}.toml"
    settings = tomllib.loads(settings_file.read_text())
    registry_settings = runner.workdir / "registry.toml"
    version = runner.processes["registry"].ready["version"]
    head = chain_head(log_db)
    # the operator's backup key, kept apart from the machine
    key = tmp_path / "backup.key"
    (made,) = gateway_at_once(["backup-key", "--out", key])
    assert f"written to {key} (mode 0600)" in made

    server_out, _ = gateway_at_once(
        [
            "server",
            "backup",
            "--config",
            settings_file,
            "--key",
            key,
            "--out",
            tmp_path / "server.zip",
        ],
        [
            "registry",
            "backup",
            "--config",
            registry_settings,
            "--key",
            key,
            "--out",
            tmp_path / "registry.zip",
        ],
    )
    assert f"message log included (main at record {head[0]})" in server_out
    # the backup holds the keys: only its owner may read it
    assert (tmp_path / "server.zip").stat().st_mode & 0o077 == 0
    with zipfile.ZipFile(tmp_path / "server.zip") as zf:
        listed = {f["path"] for f in json.loads(zf.read("manifest.json"))["files"]}
    (signing,) = settings["signing"].values()
    keys = {settings["provider"]["tls_key"], signing["key"]}
    assert keys <= listed

    # the machine is lost: the processes; the server's settings, keys, state and log; the
    # registry's database
    runner.stop(server, kill=True)
    runner.stop("registry", kill=True)
    wiped = [settings_file, *map(Path, keys), Path(settings["provider"]["tls_certificate"])]
    for path in wiped:
        path.unlink()
    shutil.rmtree(settings["server"]["state_dir"])
    assert not log_db.exists()
    (runner.workdir / "state" / "registry.db").unlink()

    server_out, _ = gateway_at_once(
        ["server", "restore", "--key", key, "--from", tmp_path / "server.zip"],
        [
            "registry",
            "restore",
            "--config",
            registry_settings,
            "--key",
            key,
            "--from",
            tmp_path / "registry.zip",
        ],
    )
    assert "message log restored" in server_out
    assert all(path.exists() for path in wiped)
    assert chain_head(log_db) == head

    # never an old number again: past every version published after the backup
    assert runner.start("registry")["version"] > version + 1000
    runner.start(server)
    assert asyncio.run(answered(runner, 5)) == 5
    seq, _ = chain_head(log_db)
    assert seq > head[0]  # the chain went on from where the backup ended
    (first,) = query_log(log_db, "SELECT prev_hash FROM message_log WHERE seq = ?", head[0] + 1)
    assert bytes(first["prev_hash"]) == head[1]
    verified = audit_verify(log_db)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    request = urllib.request.Request(
        f"{runner.api_url}/v1/admin-log/verify",
        headers={"Authorization": f"Bearer {runner.token('auditor')}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert json.load(response)["verified"] is True

    # a second restore over the newer state writes nothing: the newer log and caches stay
    runner.stop(server, kill=True)
    again = restore(tmp_path / "server.zip", key=load_key(key))
    assert (again.written, again.log) == (0, "kept")
    assert chain_head(log_db)[0] == seq
