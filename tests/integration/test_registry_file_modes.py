"""The registry's private files are its owner's only (README, *File modes*; `api.token_key`).

- What `gateway registry` commands create (its SQLite database and the folder made for it,
  its token-signing key and the folder made for it, a backup) is owner-only even when the
  command is started with umask 000: every `gateway` command sets umask 077 itself.
- At start-up, `gateway registry serve` tightens its SQLite file and token key when an
  earlier run (or an operator) left them wider, logging `file_mode_tightened` with each.

The commands run as `gateway` runs them, in child processes (`main` sets the process's
umask for good), the server stopped by SIGTERM as a supervisor stops it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from certs.pki import init_pki
from gateway.identifiers import MemberId
from gateway_ops.backupfile import create_key
from gateway_ops.runtime import read_settings
from registry.main import RegistrySettings


def _mode(path: Path) -> str:
    return oct(path.lstat().st_mode & 0o777)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pki")
    init_pki(
        folder,
        instance="UY",
        members=[MemberId.parse("UY/GOV/DNIC")],
        servers=[],
        registry_addresses=["127.0.0.1:7000"],
        now=datetime.now(UTC),
    )
    return folder


def registry_config(folder: Path, pki: Path) -> Path:
    """A registry's settings: its database and token key in folders that do not exist yet."""
    config = folder / "registry.toml"
    config.write_text(
        f"""instance = "UY"
listen = "127.0.0.1:0"
database = "state/registry.db"
signing_certificate = "{pki / "configuration-signing.crt"}"
signing_key = "{pki / "configuration-signing.key"}"
[api]
listen = "127.0.0.1:0"
token_key = "keys/registry-token.key"
[ops]
listen = "127.0.0.1:0"
""",
        encoding="utf-8",
    )
    return config


def test_what_registry_commands_create_is_owner_only_whatever_umask_they_start_with(
    tmp_path: Path, pki: Path
) -> None:
    """Started with umask 000 (everything would be 0666/0777): `gateway registry token`
    creates the token-signing key 0600 in a new folder 0700, and `gateway registry backup`
    creates the SQLite database 0600 in a new folder 0700 and writes the backup 0600."""
    config = registry_config(tmp_path, pki)
    key = tmp_path / "backup.key"
    create_key(key)
    backup = tmp_path / "registry-backup.zip"
    token = ["registry", "token", "--config", str(config), "--role", "auditor", "--subject", "a"]
    backup_args = ["registry", "backup", "--config", str(config), "--key", str(key)]
    commands = [token, [*backup_args, "--out", str(backup)]]
    # one child runs both through `main`, one after the other, as two `gateway` commands
    # would (the interpreter's start-up is most of the time)
    script = (
        "import sys\n"
        "from gateway_cli.main import main\n"
        f"for args in {commands!r}:\n"
        "    if main(args) != 0:\n"
        "        sys.exit(f'failed: {args}')\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", script], umask=0, capture_output=True, text=True, timeout=30
    )
    assert child.returncode == 0, child.stderr
    assert zipfile.ZipFile(backup).testzip() is None
    found = {
        path.relative_to(tmp_path).as_posix(): _mode(path)
        for path in tmp_path.rglob("*")
        if path not in (config, key)
    }
    assert found == {
        "keys": "0o700",
        "keys/registry-token.key": "0o600",
        "state": "0o700",
        "state/registry.db": "0o600",
        "registry-backup.zip": "0o600",
    }


def test_registry_serve_tightens_its_database_and_token_key_left_wider(
    tmp_path: Path, pki: Path
) -> None:
    """A registry database and token key left 0644 (umask 022) are 0600 once `gateway
    registry serve` has started, each path logged as `file_mode_tightened` (with the mode it
    had), before the registry says it is ready."""
    config = registry_config(tmp_path, pki)
    settings = read_settings(RegistrySettings, config)
    database = tmp_path / "state" / "registry.db"
    token_key = settings.token_key_path(tmp_path)
    database.parent.mkdir()
    database.write_bytes(b"")  # an empty file is an empty SQLite database
    database.chmod(0o644)
    token_key.parent.mkdir()
    token_key.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    token_key.chmod(0o644)
    ready = tmp_path / "ready.json"
    command = [
        sys.executable, "-m", "gateway_cli.main", "registry", "serve",
        "--config", str(config), "--ready-file", str(ready),
    ]  # fmt: skip
    with subprocess.Popen(command, stderr=subprocess.PIPE, text=True, umask=0o022) as child:
        try:
            deadline = time.monotonic() + 30
            while not ready.exists() and child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert ready.exists(), "the registry never said it was ready"
            seen = {"database": _mode(database), "token_key": _mode(token_key)}
        finally:
            child.send_signal(signal.SIGTERM)  # what a supervisor does
            _, stderr = child.communicate(timeout=30)
    assert seen == {"database": "0o600", "token_key": "0o600"}  # while it served
    events = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    tightened = [(e["path"], e["was"]) for e in events if e["event"] == "file_mode_tightened"]
    assert tightened == [(str(database), "0o644"), (str(token_key), "0o644")], stderr
    names = [e["event"] for e in events]
    assert names.index("file_mode_tightened") < names.index("registry_started")


def test_a_registry_backup_is_owner_only_whatever_was_left_beside_it(
    tmp_path: Path, pki: Path
) -> None:
    """A `<out>.tmp` left 0644 beside the backup (an earlier version's temporary name), or
    a link planted there, changes nothing: the backup is a new file, 0600."""
    config = registry_config(tmp_path, pki)
    key = tmp_path / "backup.key"
    create_key(key)
    backup = tmp_path / "registry-backup.zip"
    left = tmp_path / "registry-backup.zip.tmp"
    left.write_bytes(b"")
    left.chmod(0o644)
    victim = tmp_path / "victim"
    victim.write_bytes(b"someone else's file")
    backup.symlink_to(victim)  # a link where the backup goes: replaced, not written through
    command = [
        sys.executable, "-m", "gateway_cli.main", "registry", "backup",
        "--config", str(config), "--out", str(backup), "--key", str(key),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not backup.is_symlink() and _mode(backup) == "0o600"
    assert victim.read_bytes() == b"someone else's file"
    assert zipfile.ZipFile(backup).testzip() is None
    assert left.read_bytes() == b""  # not written through
    assert not list(tmp_path.glob(".registry-backup.zip.*.tmp"))  # nothing left behind
