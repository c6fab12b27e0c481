"""Backup and restore of a security server's state: `gateway server backup` and `restore`.

A backup is one zip file holding:

- the settings file, and every file the settings name (the anchor, the authentication and
  signing certificates and keys, the pseudonym secret, TLS certificates and keys of the
  consumer endpoint and auditor API, CA files), each under its absolute path;
- the state folder (`server.state_dir`): the cached configurations and their parts, the
  OCSP answers about the server's own certificates, the pseudonym secret when it lives
  there; not the archive files (`gateway audit archive` writes and registers those);
- a SQLite message log (with its time-stamp batches: the time-stamper's state), copied
  consistently while the server runs (SQLite's online backup), unless `--without-log`. A
  PostgreSQL log is backed up with PostgreSQL's own tools; the backup records its chains'
  heads;
- `manifest.json`: the format, the server, when it was taken, each file's path, size, mode,
  owner and SHA-256, and the head (last record and its hash) of every chain of the log;
- `manifest.mac`: the manifest's HMAC under the backup key (`gateway backup-key`), a file
  the operator keeps apart from the backups (a backup refuses to hold it).

Restore checks the manifest's MAC under the backup key before it reads anything else: an
edited backup decides where a restore writes (its settings name the places) and with which
owner, so one the key did not make writes nothing. Then it checks every file against the
manifest, and refuses a file that exists with
other content (unless forced) and a log that exists and ends before the backup's heads;
then it writes each missing file atomically with its permission bits (and, run as root,
its owner). It writes only the backup's settings file, the files those settings name, the
log and what lies in the state folder, whatever else an authenticated manifest names. Caches
that exist (the
configuration and OCSP answers, newer than the backup's) are kept, and so is an existing log
that holds the backup's head records (same hashes) and maybe more: a restore never takes
records away. The restored server goes on with its log's chain where the log ends.

The backup holds the server's private keys: keep it as the keys are kept (the file is
written with mode 0600).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import sqlite3
import stat
import tempfile
import tomllib
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import IO, Any, BinaryIO

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from gateway.settings import database_url, load_settings
from gateway.timeutil import format_time
from gateway_ops.backupfile import (
    ZIP_ERRORS,
    BackupFileError,
    BackupKey,
    opened_backup,
    read_member,
    write_manifest,
)
from gateway_ops.runtime import read_settings
from security_server.settings import ServerSettings

FORMAT = "gateway-server-backup/2"
LOG_MEMBER = "log/messagelog.db"
# bytes read at a time from a message log, which may be large
CHUNK = 1 << 20
# SQLite's files beside a database: never copied as they stand
_SQLITE_SIDE = ("-wal", "-shm", "-journal")


class BackupError(Exception):
    """A backup that cannot be taken, read or restored; the message says why."""


@dataclass(frozen=True, slots=True)
class Summary:
    files: int
    # files restored, and files already there with the same content or caches already
    # there (restore only)
    written: int
    unchanged: int
    # chain -> (last seq, its hash hex)
    heads: dict[str, tuple[int, str]]
    # "included", "kept" (restore: an existing log at or beyond the backup), "restored",
    # "postgresql" (not in the backup), "left out" (--without-log)
    log: str


def _named_files(value: Any) -> Iterator[Path]:
    """Every path the settings name (a folder is not a file: state_dir is walked apart)."""
    if isinstance(value, Path):
        yield value
    elif isinstance(value, tuple | list):
        for item in value:
            yield from _named_files(item)
    elif isinstance(value, Mapping):  # the signing keys, by member
        for item in value.values():
            yield from _named_files(item)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _named_files(getattr(value, f.name))


def _log_location(settings: ServerSettings, config: Path) -> tuple[str, Path | None]:
    """The log's database URL and, for SQLite, its file."""
    url = database_url(settings.log.database, base=config.resolve().parent)
    if url.startswith("sqlite"):
        return url, _absolute(Path(url.split("///", 1)[1]))
    return url, None


def _archive_dir(settings: ServerSettings, config: Path) -> Path:
    if settings.log.archive_dir:
        return _absolute(config.resolve().parent / settings.log.archive_dir)
    return _absolute(settings.server.state_dir / "archive")


def _absolute(path: Path) -> Path:
    """`path` made absolute and normal, its symbolic links not followed: a file is recorded
    under the name the settings give it (a certificate named through a link, as certbot's
    `live/` folder has them, is restored there), and nothing a link in the state folder
    points to is taken for the server's own."""
    return Path(os.path.abspath(path))


def _sqlite_heads(path: Path) -> dict[str, tuple[int, str]]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT chain, seq, hash FROM message_log AS m WHERE seq = "
            "(SELECT MAX(seq) FROM message_log WHERE chain = m.chain)"
        ).fetchall()
    except sqlite3.Error as exc:
        raise BackupError(f"cannot read the message log {path}: {exc}") from None
    finally:
        db.close()
    return {str(chain): (int(seq), bytes(h).hex()) for chain, seq, h in rows}


async def _postgres_heads(url: str) -> dict[str, tuple[int, str]]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(
                sa.text(
                    "SELECT DISTINCT ON (chain) chain, seq, hash FROM message_log "
                    "ORDER BY chain, seq DESC"
                )
            )
            return {str(r.chain): (int(r.seq), bytes(r.hash).hex()) for r in rows}
    except sa.exc.SQLAlchemyError as exc:
        raise BackupError(f"cannot read the message log's heads: {exc}") from None
    finally:
        await engine.dispose()


def _entry(
    name: str,
    path: Path,
    data: bytes,
    mode: int,
    cache: bool = False,
    owner: tuple[int, int] = (-1, -1),
) -> dict[str, Any]:
    return {
        "name": name,
        # the owner, restored when restore runs as root (a service user's keys stay its own)
        "uid": owner[0],
        "gid": owner[1],
        # a cache (configuration, OCSP answers) that exists at restore is newer: kept
        "cache": cache,
        "path": str(path),
        "size": len(data),
        "mode": stat.S_IMODE(mode),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


async def backup(
    config: Path,
    out: Path,
    *,
    key: BackupKey,
    now: datetime,
    with_log: bool = True,
    progress: Callable[[str], None] = lambda _: None,
) -> Summary:
    """Write a backup of the server whose settings file is `config` to `out` (mode 0600,
    replaced atomically), its manifest authenticated with `key`."""
    try:
        settings = read_settings(ServerSettings, config)
    except Exception as exc:  # whatever the settings file shows
        raise BackupError(f"cannot read the settings {config}: {exc}") from None
    url, log_file = _log_location(settings, config)
    heads = await _postgres_heads(url) if log_file is None else None
    return await asyncio.to_thread(
        _write_backup, settings, config, out, key, now, log_file, heads, with_log, progress
    )


def _write_backup(
    settings: ServerSettings,
    config: Path,
    out: Path,
    key: BackupKey,
    now: datetime,
    log_file: Path | None,
    pg_heads: dict[str, tuple[int, str]] | None,
    with_log: bool,
    progress: Callable[[str], None],
) -> Summary:
    archive = _archive_dir(settings, config)
    state = _absolute(settings.server.state_dir)
    sources: dict[Path, None] = {config.resolve(): None}
    for named in _named_files(settings):
        path = _absolute(named)
        if path != state and path.is_file():
            sources[path] = None
    if state.is_dir():
        for path in sorted(state.rglob("*")):
            skip = path == log_file or (
                log_file is not None and path.name in {log_file.name + s for s in _SQLITE_SIDE}
            )
            if path.is_symlink():  # not the server's: whatever it points to stays out
                progress(f"{path} (a symbolic link: left out)")
            elif path.is_file() and not skip and archive not in path.parents:
                sources[path] = None
    # the backup restores: every file it holds is one a restore writes (see _places)
    allowed = _places(settings, config.resolve(), log_file)
    for path in sources:
        if not allowed(path):
            raise BackupError(f"{path} would be in the backup, but a restore would not write it")
    try:
        info = key.path.stat()
        key_file = (info.st_dev, info.st_ino)
    except OSError:
        key_file = None

    entries: list[dict[str, Any]] = []
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)  # mode 0600 from mkstemp
    tmp = Path(tmp_name)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for number, path in enumerate(sources):
                try:
                    data, info = path.read_bytes(), path.stat()
                except FileNotFoundError:  # a cache file replaced while walking: a cache
                    continue
                except OSError as exc:
                    raise BackupError(f"cannot read {path}: {exc}") from None
                if path == key.path or (info.st_dev, info.st_ino) == key_file:
                    raise BackupError(
                        f"the backup key {key.path} would be in the backup, as {path} (the "
                        "settings name it, or it lies in the state folder): keep it apart "
                        "from what it authenticates"
                    )
                name = f"files/{number:04d}/{path.name}"
                zf.writestr(name, data)
                cache = state in path.parents and (
                    path.relative_to(state).parts[0].startswith("configuration")
                    or path.relative_to(state).parts[0] == "ocsp"
                )
                entries.append(
                    _entry(name, path, data, info.st_mode, cache, (info.st_uid, info.st_gid))
                )
                progress(str(path))
            if log_file is None:
                assert pg_heads is not None
                heads, how = pg_heads, "postgresql"
            elif not with_log:
                heads, how = _sqlite_heads(log_file), "left out"
            else:
                with tempfile.TemporaryDirectory(dir=out.parent) as folder:
                    copy = Path(folder) / "messagelog.db"
                    sqlite_snapshot(log_file, copy)
                    heads, how = _sqlite_heads(copy), "included"
                    zf.write(copy, LOG_MEMBER)
                    with copy.open("rb") as snapshot:
                        size, digest = _digest(snapshot)
                info = log_file.stat()
                entry = _entry(LOG_MEMBER, log_file, b"", 0o600, owner=(info.st_uid, info.st_gid))
                entries.append({**entry, "size": size, "sha256": digest})
                progress(f"{log_file} (message log)")
            manifest = {
                "format": FORMAT,
                "server": settings.server.id,
                "taken_at": format_time(now),
                "settings": str(config.resolve()),
                "files": entries,
                "log": {"kind": how, "chains": {c: list(h) for c, h in heads.items()}},
            }
            write_manifest(zf, manifest, key)
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return Summary(files=len(entries), written=0, unchanged=0, heads=heads, log=how)


def sqlite_snapshot(source: Path, target: Path) -> None:
    """A consistent copy of a SQLite database another process may be writing."""
    try:
        src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
        dst = sqlite3.connect(target)
        try:
            src.backup(dst)
        finally:
            dst.close()
            src.close()
    except sqlite3.Error as exc:
        raise BackupError(f"cannot copy the message log {source}: {exc}") from None


def _digest(stream: IO[bytes], copy_to: IO[bytes] | None = None) -> tuple[int, str]:
    """The size and SHA-256 (hex) of what a stream holds, read a chunk at a time (and
    written to `copy_to` as it is read, when given)."""
    digest, size = hashlib.sha256(), 0
    while chunk := stream.read(CHUNK):
        digest.update(chunk)
        size += len(chunk)
        if copy_to is not None:
            copy_to.write(chunk)
    return size, digest.hexdigest()


def _read(path: Path, key: BackupKey) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The manifest (authenticated by `key`) and every file's content but the message log's
    (which may be large: it is read from the zip again when written, and checked again as
    it is), each checked against its SHA-256 and size."""
    try:
        with opened_backup(path, FORMAT, "security server", key) as (zf, manifest):
            return manifest, _checked(zf, manifest)
    except BackupFileError as exc:
        raise BackupError(str(exc)) from None


def _checked(zf: zipfile.ZipFile, manifest: dict[str, Any]) -> dict[str, bytes]:
    """Every file's content but the message log's, each checked against its SHA-256 and
    size."""
    contents: dict[str, bytes] = {}
    for entry in manifest["files"]:
        if entry["name"] == LOG_MEMBER:
            try:
                with zf.open(LOG_MEMBER) as member:
                    size, digest = _digest(member)
            except ZIP_ERRORS as exc:
                raise BackupError(f"the backup's message log cannot be read: {exc}") from None
        else:
            # no more than the manifest says is read (a file swapped in could be a zip bomb)
            data = read_member(zf, entry["name"], int(entry["size"]), Path(zf.filename or ""))
            size, digest = len(data), hashlib.sha256(data).hexdigest()
            contents[entry["name"]] = data
        if size != entry["size"] or digest != entry["sha256"]:
            raise BackupError(
                f"{entry['path']} in the backup does not match its SHA-256: the backup is "
                "damaged; nothing was restored"
            )
    return contents


def _write(
    path: Path,
    fill: Callable[[BinaryIO], None],
    mode: int,
    owner: tuple[int, int],
    before_replace: Callable[[], None],
) -> None:
    """Write what `fill` writes beside `path` and rename it into place, with `mode`
    (permission bits only) and, when running as root, `owner`."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode & 0o777)
        if os.geteuid() == 0 and min(owner) >= 0:
            os.chown(tmp, *owner)
        before_replace()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _places(
    settings: ServerSettings, settings_path: Path, log_file: Path | None
) -> Callable[[Path], bool]:
    """Whether a path is one of a server's: its settings file, the files they name, its
    SQLite log, or in its state folder."""
    named = {settings_path, *(_absolute(p) for p in _named_files(settings))}
    if log_file is not None:
        named.add(log_file)
    state = _absolute(settings.server.state_dir)

    def allowed(path: Path) -> bool:
        if not path.is_absolute() or ".." in path.parts:
            return False
        return path in named or state in path.parents

    return allowed


def _allowed(
    manifest: dict[str, Any], contents: dict[str, bytes]
) -> tuple[Callable[[Path], bool], Path]:
    """Whether a path may be written: the backup's settings file, the files its settings
    name, the message log and what lies in the state folder; nothing else, whatever the
    manifest says. Those places come from the settings file in the backup: the manifest's
    MAC, checked before, is what keeps them the server's. And the state folder."""
    settings_path = Path(manifest["settings"])
    (entry,) = [e for e in manifest["files"] if e["path"] == str(settings_path)] or [None]
    if entry is None or not settings_path.is_absolute():
        raise BackupError("the backup does not hold its settings file")
    try:
        doc = tomllib.loads(contents[entry["name"]].decode())
        settings = load_settings(ServerSettings, doc, base=settings_path.parent, env=os.environ)
    except Exception as exc:  # whatever a damaged settings file shows
        raise BackupError(f"the backup's settings file cannot be read: {exc}") from None
    _, log_file = _log_location(settings, settings_path)
    return _places(settings, settings_path, log_file), _absolute(settings.server.state_dir)


def _through_link(path: Path, state: Path) -> Path | None:
    """Where a path in the state folder really leads, when a symbolic link inside the
    folder takes it out (the server's own user can make one: a restore run as root would
    write through it); None when it stays inside."""
    real, root = Path(os.path.realpath(path.parent)), Path(os.path.realpath(state))
    return None if real == root or root in real.parents else real


def _hash_at(path: Path, chain: str, seq: int) -> str | None:
    """The hash (hex) of a log's record `seq` of `chain`, or None when it has none."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        row = db.execute(
            "SELECT hash FROM message_log WHERE chain = ? AND seq = ?", (chain, seq)
        ).fetchone()
    except sqlite3.Error as exc:
        raise BackupError(f"cannot read the message log {path}: {exc}") from None
    finally:
        db.close()
    return None if row is None else bytes(row[0]).hex()


def restore(
    source: Path,
    *,
    key: BackupKey,
    force: bool = False,
    progress: Callable[[str], None] = lambda _: None,
) -> Summary:
    """Put the files of a backup authenticated by `key` back where they were (see the
    module's description)."""
    manifest, contents = _read(source, key)
    log_entry = next((e for e in manifest["files"] if e["name"] == LOG_MEMBER), None)
    allowed, state = _allowed(manifest, contents)
    wanted = {c: (int(h[0]), str(h[1])) for c, h in manifest["log"]["chains"].items()}
    # path, content, mode, owner, is the log
    plan: list[tuple[Path, bytes, int, tuple[int, int], bool]] = []
    conflicts: list[str] = []
    unchanged = kept = 0
    log_how = str(manifest["log"]["kind"])
    for entry in manifest["files"]:
        path = Path(PurePosixPath(entry["path"]))
        data = contents.get(entry["name"], b"")  # the log's is read when written
        owner = (int(entry.get("uid", -1)), int(entry.get("gid", -1)))
        if not allowed(path):
            raise BackupError(
                f"the backup names {entry['path']}, which is neither its settings file, a file "
                "they name, the message log nor in the state folder: nothing was restored"
            )
        elsewhere = _through_link(path, state) if state in path.parents else None
        if elsewhere is not None:
            raise BackupError(
                f"{path} would be written in {elsewhere}: a symbolic link in the state folder "
                "leads out of it; remove the link, then restore (nothing was restored)"
            )
        if entry["name"] == LOG_MEMBER:
            if path.exists():
                heads = _sqlite_heads(path)
                behind = [c for c, (seq, _) in wanted.items() if heads.get(c, (0, ""))[0] < seq]
                other = [
                    c
                    for c, (seq, digest) in wanted.items()
                    if c not in behind and _hash_at(path, c, seq) != digest
                ]
                if behind and not force:
                    conflicts.append(
                        f"{path}: the message log there ends before the backup's "
                        f"(chains {', '.join(sorted(behind))}); move it away to restore the "
                        "backup's"
                    )
                elif other and not force:
                    conflicts.append(
                        f"{path}: the message log there has another history than the "
                        f"backup's (chains {', '.join(sorted(other))}); move it away to "
                        "restore the backup's"
                    )
                elif not behind and not other:
                    log_how = "kept"
                    continue
            log_how = "restored"
            plan.append((path, data, 0o600, owner, True))
            continue
        if path.exists() and entry.get("cache"):
            kept += 1
            continue
        if path.exists():
            try:
                same = path.read_bytes() == data
            except OSError as exc:
                raise BackupError(f"cannot read {path}: {exc}") from None
            if same:
                unchanged += 1
                continue
            if not force:
                conflicts.append(f"{path}: exists with other content")
                continue
        plan.append((path, data, int(entry["mode"]), owner, False))
    if conflicts:
        raise BackupError(
            "nothing was restored; these would be replaced (--force replaces them):\n  "
            + "\n  ".join(conflicts)
        )
    for path, data, mode, owner, is_log in plan:

        def drop_sides(path: Path = path, is_log: bool = is_log) -> None:
            # the journal of a log being replaced (--force) belongs to the old one; dropped
            # only once the new one is written in full beside it
            for side in _SQLITE_SIDE if is_log else ():
                path.with_name(path.name + side).unlink(missing_ok=True)

        def fill(out: BinaryIO, data: bytes = data, is_log: bool = is_log) -> None:
            if not is_log:
                out.write(data)
                return
            # read again from the zip, which may have changed since it was checked: what is
            # written is checked as it is copied, and never takes the log's place otherwise
            assert log_entry is not None
            try:
                with zipfile.ZipFile(source) as zf, zf.open(LOG_MEMBER) as member:
                    size, digest = _digest(member, copy_to=out)
            except ZIP_ERRORS as exc:
                raise BackupError(f"cannot read the message log from {source}: {exc}") from None
            if size != log_entry["size"] or digest != log_entry["sha256"]:
                raise BackupError(
                    f"the message log in {source} changed while it was restored; it was not written"
                )

        _write(path, fill, mode, owner, drop_sides)
        progress(str(path))
    return Summary(
        files=len(manifest["files"]),
        written=len(plan),
        unchanged=unchanged + kept,
        heads=wanted,
        log=log_how,
    )
