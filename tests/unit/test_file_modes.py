"""Files and folders holding personal data or secrets are owner-only, even when left wider."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import structlog

from gateway.errors import ConfigFileError
from gateway_ops.runtime import restrict_modes, restrict_state, sqlite_files
from security_server.private_files import open_private


def _mode(path: Path) -> int:
    return path.lstat().st_mode & 0o777


def test_restrict_modes_tightens_what_was_left_wider_and_logs_it(tmp_path: Path) -> None:
    """A 0755 state folder and the 0644 files in it (and named files) become 0700/0600, logged."""
    state = tmp_path / "state"
    (state / "ocsp").mkdir(parents=True)
    files = [state / "configuration.json", state / "ocsp" / "a.der", tmp_path / "log.db"]
    for path in files:
        path.write_bytes(b"x")
        path.chmod(0o644)
    for folder in (state, state / "ocsp"):
        folder.chmod(0o755)
    (state / "link").symlink_to(tmp_path / "elsewhere")
    already = state / "key"
    already.write_bytes(b"k")
    already.chmod(0o600)
    with structlog.testing.capture_logs() as logs:
        tightened = restrict_modes(state, [tmp_path / "log.db", tmp_path / "log.db-wal"])
    assert _mode(state) == _mode(state / "ocsp") == 0o700
    assert all(_mode(p) == 0o600 for p in files)
    assert set(tightened) == {state, state / "ocsp", *files}
    assert [e["path"] for e in logs if e["event"] == "file_mode_tightened"] == [
        str(p) for p in tightened
    ]


def test_restrict_modes_creates_a_missing_folder_owner_only(tmp_path: Path) -> None:
    """A state folder that does not exist yet is created 0700, whatever the umask."""
    old = os.umask(0o022)
    try:
        restrict_modes(tmp_path / "new" / "state")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "new" / "state") == 0o700


def test_open_private_writes_0600_even_over_a_wider_file(tmp_path: Path) -> None:
    """A cache or bundle is written 0600 whatever the umask, also over a 0644 file."""
    path = tmp_path / "bundle.zip"
    path.write_bytes(b"old")
    path.chmod(0o644)
    old = os.umask(0o022)
    try:
        with open_private(path) as f:
            f.write(b"new")
        with open_private(tmp_path / "fresh") as f:
            f.write(b"x")
    finally:
        os.umask(old)
    assert path.read_bytes() == b"new"
    assert _mode(path) == _mode(tmp_path / "fresh") == 0o600


def test_sqlite_files_are_the_database_and_its_companions() -> None:
    """A SQLite URL names the database, -wal, -shm and -journal; a server URL names none."""
    assert sqlite_files("sqlite+aiosqlite:////var/lib/g/log.db") == [
        Path("/var/lib/g/log.db" + s) for s in ("", "-wal", "-shm", "-journal")
    ]
    assert sqlite_files("postgresql+asyncpg://u@h/db") == []


def test_an_in_memory_or_parameterised_sqlite_url_names_no_stray_file() -> None:
    """An in-memory database has no file (no IndexError at start), and a URL's query is
    not part of the file's name."""
    assert sqlite_files("sqlite+aiosqlite://") == []
    assert sqlite_files("sqlite+aiosqlite:///:memory:") == []
    assert sqlite_files("sqlite+aiosqlite:////srv/log.db?timeout=5")[0] == Path("/srv/log.db")


def test_restrict_state_finds_the_database_beside_the_configuration(tmp_path: Path) -> None:
    """A relative database setting is the file beside the configuration (as the server
    opens it), and it is made owner-only with the other files given."""
    (tmp_path / "server.toml").write_text("")
    for name in ("log.db", "log.db-wal", "token.key"):
        (tmp_path / name).write_bytes(b"x")
        (tmp_path / name).chmod(0o644)
    restrict_state(tmp_path / "server.toml", "log.db", files=[tmp_path / "token.key"])
    assert [_mode(tmp_path / n) for n in ("log.db", "log.db-wal", "token.key")] == [0o600] * 3


def test_a_path_that_cannot_be_tightened_stops_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wide file that cannot be chmod-ed (another user's) is a configuration error, not ignored."""
    path = tmp_path / "log.db"
    path.write_bytes(b"x")
    path.chmod(0o644)

    def refuse(self: Path, mode: int) -> None:
        raise PermissionError("operation not permitted")

    monkeypatch.setattr(Path, "chmod", refuse)
    with pytest.raises(ConfigFileError, match="cannot be made owner-only"):
        restrict_modes(files=[path])


def test_a_group_readable_file_that_cannot_change_is_kept_one_open_to_others_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Kubernetes Secret is mounted read-only and read through the pod's group (0440):
    the process starts and says so; a file others may read stops it."""
    secret, open_file = tmp_path / "registry-token.key", tmp_path / "open.key"
    for path, mode in ((secret, 0o440), (open_file, 0o444)):
        path.write_bytes(b"k")
        path.chmod(mode)

    def read_only(self: Path, mode: int) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(Path, "chmod", read_only)
    with structlog.testing.capture_logs() as logs:
        assert restrict_modes(None, [secret]) == []
    assert [(e["event"], e["mode"]) for e in logs] == [("file_mode_kept", "0o440")]
    with pytest.raises(ConfigFileError, match="readable by others"):
        restrict_modes(None, [open_file])
