"""Backup and restore of a registry's database: `gateway registry backup` and `restore`.

A backup is one zip file read in one transaction (a consistent snapshot: SQLite's
deferred transaction, PostgreSQL's REPEATABLE READ): one JSON-lines file per table of the
store (members, subsystems, servers, services, agreements, the admin log and its head,
federations, outbound approvals, checkpoints, the configuration history), and
`manifest.json` naming the format, the instance, the schema revision, when it was taken,
and each table's row count and SHA-256, and `manifest.mac`: the manifest's HMAC under the
backup key (`gateway backup-key`), which the operator keeps apart from the backups. The
backup holds no other key: the configuration signing key and the token key are files the
operator keeps (and backs up) apart.

Restore checks the manifest's MAC under the backup key first (an edited backup would
otherwise decide what the restored registry signs and publishes: members, agreements and an
admin log rebuilt to match), every table's SHA-256 and count against the manifest, and that the
manifest's schema revision is the database's (run by the same version of the gateway),
then writes the rows into an empty database in one transaction, and verifies the admin
log's chain. The restored registry goes on with the admin log's chain where the backup
left it, and with the configuration's version sequence `SKIP_VERSIONS` (10,000,
`--skip-versions`) plus one per second (or per refresh period, when shorter) since the
backup was taken past the backup's: the versions published after the backup was taken are not in
it, and security servers take only versions newer than the one they hold. A database that already
holds a registry is refused: restore never merges.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import math
import os
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic.migration import MigrationContext
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.audit import ADMIN_LOG as ADMIN_LOG_FORMAT
from gateway.audit import ChainBrokenError, ChainHead, verify_chain
from gateway.timeutil import format_time, parse_time
from gateway_ops.backupfile import (
    BackupFileError,
    BackupKey,
    opened_backup,
    read_member,
    write_manifest,
)
from registry.store import (
    RegistryStore,
    admin_head,
    admin_log,
    admin_record,
    configurations,
    metadata,
)

FORMAT = "gateway-registry-backup/2"
# how far past the backup's version a restored registry's version counter goes on: further
# than the versions a registry publishes between a backup and its restore (a change or a
# refresh each), so that security servers, which take only newer versions, take its next
SKIP_VERSIONS = 10_000


class BackupError(Exception):
    """A backup that cannot be taken, read or restored; the message says why."""


@dataclass(frozen=True, slots=True)
class Summary:
    tables: dict[str, int]
    revision: str | None
    admin_entries: int
    configuration_version: int


def _encode(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return {"b64": base64.b64encode(bytes(value)).decode("ascii")}
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"b64"}:
        return base64.b64decode(value["b64"], validate=True)
    return value


def _revision(sync_conn: Any) -> str | None:
    return MigrationContext.configure(sync_conn).get_current_revision()


async def backup(
    store: RegistryStore,
    out: Path,
    *,
    key: BackupKey,
    instance: str,
    now: datetime,
    progress: Callable[[str, int], None] = lambda table, rows: None,
) -> Summary:
    """Write a consistent backup of the store to `out` (replaced atomically), its manifest
    authenticated with `key`."""
    # a new file, created exclusively with mode 0600: not one left beside `out` (whose mode
    # it would keep) nor a link's target
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        summary = await _write_backup(
            store, tmp, key=key, instance=instance, now=now, progress=progress
        )
        os.replace(tmp_name, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
    return summary


async def _write_backup(
    store: RegistryStore,
    tmp: Path,
    *,
    key: BackupKey,
    instance: str,
    now: datetime,
    progress: Callable[[str, int], None],
) -> Summary:
    tables: dict[str, dict[str, Any]] = {}
    async with store.engine.connect() as conn:
        if store.is_postgres:
            # one snapshot for every table
            await conn.execution_options(isolation_level="REPEATABLE READ")
        async with conn.begin():
            revision = await conn.run_sync(_revision)
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
                for table in metadata.sorted_tables:
                    lines = io.BytesIO()
                    count = 0
                    order = list(table.primary_key.columns) or list(table.columns)[:1]
                    result = await conn.execute(sa.select(table).order_by(*order))
                    for row in result:
                        doc = {k: _encode(v) for k, v in row._mapping.items()}
                        lines.write(json.dumps(doc, sort_keys=True).encode() + b"\n")
                        count += 1
                    data = lines.getvalue()
                    archive.writestr(f"{table.name}.jsonl", data)
                    tables[table.name] = {
                        "rows": count,
                        "bytes": len(data),
                        "sha256": hashlib.sha256(data).hexdigest(),
                    }
                    progress(table.name, count)
                manifest = {
                    "format": FORMAT,
                    "instance": instance,
                    "revision": revision,
                    "taken_at": format_time(now),
                    "tables": tables,
                }
                write_manifest(archive, manifest, key)
    return await _summary(store, {k: v["rows"] for k, v in tables.items()}, revision)


def read_backup(
    path: Path, key: BackupKey
) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """The manifest (authenticated by `key`) and every table's rows, each table checked
    against its SHA-256 and row count; `BackupError` naming what does not hold."""
    try:
        with opened_backup(path, FORMAT, "registry", key) as (archive, manifest):
            return manifest, _rows(archive, manifest, path)
    except BackupFileError as exc:
        raise BackupError(str(exc)) from None


def _rows(
    archive: zipfile.ZipFile, manifest: dict[str, Any], path: Path
) -> dict[str, list[dict[str, Any]]]:
    rows: dict[str, list[dict[str, Any]]] = {}
    for table in metadata.sorted_tables:
        listed = manifest["tables"].get(table.name)
        if listed is None:
            raise BackupError(f"the backup lacks table {table.name}")
        # no more than the manifest says is read (a file swapped in could be a zip bomb)
        data = read_member(archive, f"{table.name}.jsonl", int(listed["bytes"]), path)
        if hashlib.sha256(data).hexdigest() != listed["sha256"]:
            raise BackupError(
                f"table {table.name} does not match its SHA-256 in the manifest: the "
                "backup was altered or damaged"
            )
        docs = [
            {k: _decode(v) for k, v in json.loads(line).items()}
            for line in data.splitlines()
            if line
        ]
        if len(docs) != listed["rows"]:
            raise BackupError(
                f"table {table.name} holds {len(docs)} rows, the manifest says {listed['rows']}"
            )
        rows[table.name] = docs
    return rows


async def restore(
    store: RegistryStore,
    path: Path,
    *,
    key: BackupKey,
    instance: str,
    now: datetime,
    refresh_seconds: float,
    progress: Callable[[str, int], None] = lambda table, rows: None,
    skip_versions: int = SKIP_VERSIONS,
) -> Summary:
    """Restore a backup of registry `instance` into the store's database, which must hold
    no registry yet. The configuration's version counter goes on past the backup's by
    `skip_versions` plus one per second, or per `refresh_seconds` when shorter, since the
    backup was taken (a registry publishes a version every `refresh_seconds` even when
    nothing changed), so that the restored registry's next version is newer than any
    published after the backup was taken (security servers take only newer versions)."""
    if skip_versions < 0:
        raise BackupError(f"skip_versions must not be negative, not {skip_versions}")
    manifest, rows = read_backup(path, key)
    if manifest.get("instance") != instance:
        raise BackupError(
            f"the backup is of instance {manifest.get('instance')!r}, this registry's "
            f"{instance!r}: nothing was restored"
        )
    try:
        taken_at = parse_time(str(manifest["taken_at"]))
    except (KeyError, ValueError):
        raise BackupError("the backup does not say when it was taken") from None
    elapsed = max(0.0, (now - taken_at).total_seconds())
    skip = skip_versions + math.ceil(elapsed / min(refresh_seconds, 1.0))
    async with store.engine.begin() as conn:
        revision = await conn.run_sync(_revision)
        if manifest.get("revision") != revision:
            raise BackupError(
                f"the backup's schema revision is {manifest.get('revision')}, this database's "
                f"{revision}: restore it with the gateway version that took it, then upgrade"
            )
        for table in metadata.sorted_tables:
            held = await conn.scalar(sa.select(sa.func.count()).select_from(table))
            if table is admin_head:
                # a new database holds the admin log's initial head (no entry yet)
                fresh = await conn.scalar(sa.select(admin_head.c.next_seq))
                held = 0 if fresh in (None, 1) else held
            if held:
                raise BackupError(
                    f"the database already holds {held} rows in {table.name}: restore only "
                    "into an empty database (restore never merges)"
                )
        await conn.execute(admin_head.delete())
        for table in metadata.sorted_tables:
            docs = rows[table.name]
            if docs:
                await conn.execute(table.insert(), docs)
            progress(table.name, len(docs))
        if store.is_postgres:
            # identity columns go on after the restored rows
            for table in metadata.sorted_tables:
                for column in table.columns:
                    if column.autoincrement is True and column.primary_key:
                        # names from our own schema, never from the backup
                        await conn.execute(
                            sa.text(
                                f"SELECT setval(pg_get_serial_sequence('{table.name}', "  # noqa: S608
                                f"'{column.name}'), COALESCE(MAX({column.name}), 0) + 1, false) "
                                f"FROM {table.name}"
                            )
                        )
        await _verify_admin_log(conn)
        # only the newest version is stored: it carries the counter on
        await conn.execute(configurations.update().values(version=configurations.c.version + skip))
    return await _summary(store, {k: len(v) for k, v in rows.items()}, revision)


async def _verify_admin_log(conn: AsyncConnection) -> int:
    head = ChainHead(fmt=ADMIN_LOG_FORMAT)
    entries = (await conn.execute(sa.select(admin_log).order_by(admin_log.c.seq))).all()
    try:
        head = verify_chain([admin_record(r) for r in entries], head)
    except ChainBrokenError as exc:
        raise BackupError(f"the restored admin log does not verify: {exc}") from None
    recorded = (await conn.execute(sa.select(admin_head))).first()
    if recorded is not None and (int(recorded.next_seq), bytes(recorded.last_hash)) != (
        head.next_seq,
        head.last_hash,
    ):
        raise BackupError("the restored admin log does not end where its head says")
    return head.next_seq - 1


async def _summary(store: RegistryStore, tables: dict[str, int], revision: str | None) -> Summary:
    async with store.engine.connect() as conn:
        entries = await _verify_admin_log(conn)
    return Summary(
        tables=tables,
        revision=revision,
        admin_entries=entries,
        configuration_version=await store.last_version(),
    )
