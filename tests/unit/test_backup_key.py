"""The backup key file (`gateway backup-key`): created owner-only and never replaced, and
refused when others may read or change it, or when it is not a key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway_cli.main import build_parser
from gateway_ops.backupfile import BackupFileError, create_key, load_key


def test_a_new_key_is_its_owners_only_loads_back_and_is_never_replaced(tmp_path: Path) -> None:
    path = tmp_path / "backup.key"
    made = create_key(path)
    assert path.stat().st_mode & 0o777 == 0o600
    loaded = load_key(path)
    assert loaded.secret == made.secret and len(made.secret) == 32
    assert made.secret.hex() not in repr(made)  # a key in a log or traceback shows its id
    with pytest.raises(BackupFileError, match="is never replaced"):
        create_key(path)
    assert load_key(path).secret == made.secret


@pytest.mark.parametrize("mode", [0o644, 0o620, 0o604])
def test_a_key_others_may_read_or_change_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "backup.key"
    create_key(path)
    path.chmod(mode)
    with pytest.raises(BackupFileError, match="chmod 600"):
        load_key(path)


@pytest.mark.parametrize("text", ["", "zz" * 32, "ab" * 31, "ab" * 33, "\xe9"])
def test_what_is_not_a_key_is_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "backup.key"
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)
    with pytest.raises(BackupFileError, match=r"is not a backup key|cannot read"):
        load_key(path)


def test_a_missing_key_says_so(tmp_path: Path) -> None:
    with pytest.raises(BackupFileError, match="cannot read the backup key"):
        load_key(tmp_path / "nowhere.key")


def test_the_commands_refuse_a_key_others_may_read_before_doing_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`gateway backup-key` writes a key; `gateway server restore` with that key made
    readable by others exits 2 naming the problem, and a second `backup-key` to the same
    file exits 1 leaving the key as it was. (The commands' functions, run without `main`,
    which sets the process's umask and logging for good.)"""

    def main(argv: list[str]) -> int:
        ns = build_parser(argv[0]).parse_args(argv)
        return int(ns.func(ns))

    key = tmp_path / "backup.key"
    assert main(["backup-key", "--out", str(key)]) == 0
    made = load_key(key)
    assert made.ident in capsys.readouterr().out
    assert main(["backup-key", "--out", str(key)]) == 1
    assert "is never replaced" in capsys.readouterr().err
    assert load_key(key).secret == made.secret
    key.chmod(0o644)
    backup = tmp_path / "server.zip"
    assert main(["server", "restore", "--key", str(key), "--from", str(backup)]) == 2
    assert "chmod 600" in capsys.readouterr().err


def test_a_key_through_a_link_or_of_another_user_is_refused(tmp_path: Path) -> None:
    """Whoever could replace the key could forge a backup that a restore run as root
    takes: a key reached through a symbolic link, or owned by another user than the one
    running the command (or root), is refused."""
    path = tmp_path / "backup.key"
    create_key(path)
    link = tmp_path / "link.key"
    link.symlink_to(path)
    with pytest.raises(BackupFileError, match="cannot read the backup key"):
        load_key(link)
    if os.geteuid() != 0:
        pytest.skip("only root can give a file to another user")
    os.chown(path, 65534, 65534)
    with pytest.raises(BackupFileError, match="belongs to user 65534"):
        load_key(path)
