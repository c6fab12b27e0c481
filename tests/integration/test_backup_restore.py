"""Backup, wipe, restore (issue 17): the registry and the population registry's security
server of the demo topology are stopped, backed up with `gateway registry backup` and
`gateway server backup`, wiped (the registry's database; the server's settings, keys,
state folder and SQLite log), restored with `restore`, and started again. They resume:
the clinics' calls are answered, the server's log chain goes on from the record the
backup ended at and verifies, the admin log verifies, and the configuration's version
goes on from the last one."""

from __future__ import annotations

import asyncio
import json
import shutil
import tomllib
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

from gateway_demo.runner import Runner
from security_server.backup import restore

from .clinics import get_person
from .conftest import DNIC, MSP, audit_verify, query_log, run_gateway


def chain_head(db: Path) -> tuple[int, bytes]:
    (row,) = query_log(db, "SELECT seq, hash FROM message_log ORDER BY seq DESC LIMIT 1")
    return int(row["seq"]), bytes(row["hash"])


async def answered(runner: Runner, calls: int) -> int:
    async with runner.consumer_channel(MSP) as channel:
        outcomes = [await get_person(channel) for _ in range(calls)]
    return sum(o.ok for o in outcomes)


def test_backup_wipe_restore_and_resume(make_runner: Callable[..., Runner], tmp_path: Path) -> None:
    runner = make_runner()
    server = runner.server_names[DNIC]
    assert asyncio.run(answered(runner, 5)) == 5
    log_db = runner.log_db(DNIC)
    settings_file = runner.workdir / f"{server}.toml"
    settings = tomllib.loads(settings_file.read_text())
    registry_settings = runner.workdir / "registry.toml"
    version = runner.processes["registry"].ready["version"]

    runner.stop(server)
    runner.stop("registry")
    head = chain_head(log_db)
    done = run_gateway(
        "server", "backup", "--config", settings_file, "--out", tmp_path / "server.zip"
    )
    assert done.returncode == 0, done.stderr
    assert f"message log included (main at record {head[0]})" in done.stdout
    done = run_gateway(
        "registry", "backup", "--config", registry_settings, "--out", tmp_path / "registry.zip"
    )
    assert done.returncode == 0, done.stderr
    # the backup holds the keys: only its owner may read it
    assert (tmp_path / "server.zip").stat().st_mode & 0o077 == 0
    with zipfile.ZipFile(tmp_path / "server.zip") as zf:
        listed = {f["path"] for f in json.loads(zf.read("manifest.json"))["files"]}
    (signing,) = settings["signing"].values()
    keys = {settings["provider"]["tls_key"], signing["key"]}
    assert keys <= listed

    # the machine is lost: the server's settings, keys, state and log; the registry's database
    wiped = [settings_file, *map(Path, keys), Path(settings["provider"]["tls_certificate"])]
    for path in wiped:
        path.unlink()
    shutil.rmtree(settings["server"]["state_dir"])
    assert not log_db.exists()
    (runner.workdir / "state" / "registry.db").unlink()

    done = run_gateway("server", "restore", "--from", tmp_path / "server.zip")
    assert done.returncode == 0, done.stderr
    assert "message log restored" in done.stdout
    done = run_gateway(
        "registry", "restore", "--config", registry_settings, "--from", tmp_path / "registry.zip"
    )
    assert done.returncode == 0, done.stderr
    assert all(path.exists() for path in wiped)
    assert chain_head(log_db) == head

    assert runner.start("registry")["version"] > version  # never an old number again
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
    runner.stop(server)
    again = restore(tmp_path / "server.zip")
    assert (again.written, again.log) == (0, "kept")
    assert chain_head(log_db)[0] == seq
