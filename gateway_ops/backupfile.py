"""What the registry's and the security server's backups share: the backup key, and a
manifest authenticated with it.

A backup is a zip file whose `manifest.json` names what it holds and the SHA-256 of each
part; `manifest.mac` holds an HMAC-SHA256 of the manifest's exact bytes under the backup
key. The key is a file of 32 random bytes (hex) that `gateway backup-key` writes (mode
0600), kept apart from the backups: whoever can change a backup but not read the key cannot
make a restore accept it. Without the MAC, an edited backup decided what a restore wrote
and where (a security server's restore, run as root, wrote wherever an edited settings file
inside the backup pointed), and what a restored registry signed and published.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import stat
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# the file of a backup's zip naming what it holds, and the file authenticating it
BACKUP_MANIFEST = "manifest.json"
BACKUP_MAC = "manifest.mac"
KEY_BYTES = 32
# the largest manifest read (a backup's manifest lists files and tables: a few kilobytes),
# so that a crafted one cannot fill the memory before its MAC is checked
MAX_MANIFEST_BYTES = 16 << 20
# what reading a damaged zip member raises, besides zipfile's own errors: bad deflate data
# (zlib.error), a member cut short (EOFError), an unsupported method or encryption
# (NotImplementedError, RuntimeError)
ZIP_ERRORS = (
    zipfile.BadZipFile,
    zlib.error,
    EOFError,
    OSError,
    RuntimeError,
    NotImplementedError,
    KeyError,
)
# what the MAC covers besides the manifest: a MAC of another use of the key never passes
_MAC_CONTEXT = b"gateway-backup-manifest/1\n"


class BackupFileError(Exception):
    """A backup file or key that cannot be read, is not of the format expected or is not
    authenticated by the key given; the message says why."""


@dataclass(frozen=True, slots=True, repr=False)
class BackupKey:
    """The secret that authenticates backups, and the file it was read from."""

    secret: bytes
    path: Path

    @property
    def ident(self) -> str:
        """A short name of the key (not the key): a backup records which key made it."""
        return hashlib.sha256(b"gateway-backup-key-id\n" + self.secret).hexdigest()[:16]

    def mac(self, manifest: bytes) -> str:
        return hmac.new(self.secret, _MAC_CONTEXT + manifest, hashlib.sha256).hexdigest()

    def __repr__(self) -> str:
        return f"BackupKey(ident={self.ident!r}, path={str(self.path)!r})"


def create_key(path: Path) -> BackupKey:
    """Write a new backup key to `path` (mode 0600); an existing file is never replaced."""
    secret = os.urandom(KEY_BYTES)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise BackupFileError(
            f"{path} exists: a backup key is never replaced (the backups it made would no "
            "longer restore)"
        ) from None
    except OSError as exc:
        raise BackupFileError(f"cannot write the backup key {path}: {exc}") from None
    with os.fdopen(fd, "w") as f:
        f.write(secret.hex() + "\n")
        f.flush()
        os.fsync(f.fileno())
    return BackupKey(secret, path.resolve())


def load_key(path: Path) -> BackupKey:
    """The backup key in `path`: 64 hex digits, in a regular file (not a symbolic link) of
    the user running the command (or root's), which only its owner may read or write.
    Whoever could replace the key could make a backup that a restore run as root takes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise BackupFileError(f"cannot read the backup key {path}: {exc}") from None
    try:
        info = os.fstat(fd)  # the file read, not whatever the path names by then
        if not stat.S_ISREG(info.st_mode):
            raise BackupFileError(f"the backup key {path} is not a regular file")
        with os.fdopen(os.dup(fd), "rb") as f:
            raw = f.read(KEY_BYTES * 2 + 2)
    except OSError as exc:
        raise BackupFileError(f"cannot read the backup key {path}: {exc}") from None
    finally:
        os.close(fd)
    if info.st_uid not in (os.geteuid(), 0):
        raise BackupFileError(
            f"the backup key {path} belongs to user {info.st_uid}, not to the user running "
            f"this command ({os.geteuid()}) or root: whoever owns it could replace it"
        )
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError as exc:
        raise BackupFileError(f"cannot read the backup key {path}: {exc}") from None
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise BackupFileError(
            f"the backup key {path} may be read or changed by others (mode "
            f"{stat.S_IMODE(info.st_mode):04o}): make it its owner's only (chmod 600)"
        )
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        secret = b""
    if len(secret) != KEY_BYTES:
        raise BackupFileError(
            f"{path} is not a backup key ({KEY_BYTES * 2} hex digits, as `gateway backup-key` "
            "writes)"
        )
    return BackupKey(secret, path.resolve())


def write_manifest(archive: zipfile.ZipFile, manifest: dict[str, Any], key: BackupKey) -> None:
    """Write the manifest (recording which key made it) and its MAC into the backup."""
    data = json.dumps({**manifest, "key": key.ident}, indent=2, sort_keys=True).encode()
    archive.writestr(BACKUP_MANIFEST, data)
    archive.writestr(BACKUP_MAC, key.mac(data) + "\n")


@contextmanager
def opened_backup(
    path: Path, fmt: str, kind: str, key: BackupKey
) -> Iterator[tuple[zipfile.ZipFile, Any]]:
    """A backup's zip file and its manifest (a JSON object whose `format` is `fmt`),
    authenticated by `key` before anything in it is read; `BackupFileError` naming the
    problem otherwise (`kind` says what backup was expected, such as "registry")."""
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise BackupFileError(f"{path} is not a readable backup: {exc}") from None
    with archive:
        names = set(archive.namelist())
        if BACKUP_MAC not in names:
            raise BackupFileError(
                f"{path} is not authenticated (it has no {BACKUP_MAC}): it was taken "
                "before backups were, or was edited; nothing was restored"
            )
        data = read_member(archive, BACKUP_MANIFEST, MAX_MANIFEST_BYTES, path)
        try:
            mac = read_member(archive, BACKUP_MAC, 1024, path).decode("ascii").strip()
        except UnicodeDecodeError as exc:
            raise BackupFileError(f"{path} has no readable {BACKUP_MAC}: {exc}") from None
        if not hmac.compare_digest(mac, key.mac(data)):
            made_with = _key_named(data)
            other = made_with is not None and made_with != key.ident
            raise BackupFileError(
                f"{path} was taken with another backup key (key {made_with}; "
                f"{key.path} is key {key.ident}); nothing was restored"
                if other
                else f"{path} does not match its MAC under the backup key {key.path}: it "
                "was edited or damaged; nothing was restored"
            )
        try:
            manifest = json.loads(data)
        except ValueError as exc:
            raise BackupFileError(f"{path} has no readable {BACKUP_MANIFEST}: {exc}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != fmt:
            raise BackupFileError(f"{path} is not a {kind} backup of format {fmt}")
        yield archive, manifest


def read_member(archive: zipfile.ZipFile, name: str, limit: int, path: Path) -> bytes:
    """A member of a backup's zip, refused when it says it holds more than `limit` bytes (it
    is then not read) or cannot be read whole; `BackupFileError` naming why."""
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise BackupFileError(f"{path} lacks {name}") from None
    if info.file_size > limit:
        raise BackupFileError(
            f"{name} in {path} holds {info.file_size} bytes, more than the {limit} expected"
        )
    try:
        with archive.open(info) as member:
            data = member.read(limit + 1)
    except ZIP_ERRORS as exc:
        raise BackupFileError(f"{path} is damaged: {name} cannot be read ({exc})") from None
    if len(data) > limit:
        raise BackupFileError(f"{name} in {path} holds more than the {limit} bytes expected")
    return data


def _key_named(data: bytes) -> str | None:
    """The key an unauthenticated manifest says made it (for the error message only)."""
    try:
        named = json.loads(data).get("key")
    except (ValueError, AttributeError, RecursionError):
        return None
    return named if isinstance(named, str) and re.fullmatch("[0-9a-f]{16}", named) else None
