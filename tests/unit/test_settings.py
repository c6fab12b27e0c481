"""Settings files: every key checked, unknown keys named by path, environment overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.errors import ConfigFileError
from gateway.settings import database_url, load_settings
from security_server.node import load_subject_secret
from security_server.settings import ServerSettings

BASE = Path("/etc/gateway")


def minimal() -> dict[str, Any]:
    return {
        "server": {"id": "UY/GOV/MSP/ss1", "anchor": "anchor.json", "state_dir": "/var/lib/gw"},
        "provider": {"tls_certificate": "auth.crt", "tls_key": "auth.key"},
        "signing": {"UY/GOV/MSP": {"certificate": "sign.crt", "key": "sign.key"}},
    }


def test_defaults_and_relative_paths() -> None:
    """Omitted sections take their defaults; relative paths resolve against the file's folder."""
    settings = load_settings(ServerSettings, minimal(), base=BASE, env={})
    assert settings.server.anchor == BASE / "anchor.json"
    assert settings.server.state_dir == Path("/var/lib/gw")
    assert settings.signing["UY/GOV/MSP"].key == BASE / "sign.key"
    assert settings.consumer.listen == "127.0.0.1:8080"
    assert settings.limits.max_message_bytes == 4 * 1024 * 1024


def test_unknown_key_is_named_by_its_path() -> None:
    """A misspelt key is refused with its full path."""
    doc = minimal()
    doc["provider"]["listn"] = "0.0.0.0:1"
    with pytest.raises(ConfigFileError, match=r"provider\.listn"):
        load_settings(ServerSettings, doc, base=BASE, env={})


def test_missing_required_setting_is_named() -> None:
    """A required key that is absent is named."""
    doc = minimal()
    del doc["provider"]["tls_key"]
    with pytest.raises(ConfigFileError, match=r"missing setting: provider\.tls_key"):
        load_settings(ServerSettings, doc, base=BASE, env={})


def test_wrong_type_is_refused() -> None:
    """A value of the wrong type is refused with its path."""
    doc = minimal()
    doc["limits"] = {"max_message_bytes": "lots"}
    with pytest.raises(ConfigFileError, match=r"limits\.max_message_bytes: expected a number"):
        load_settings(ServerSettings, doc, base=BASE, env={})


def test_environment_overrides_a_key_of_a_section_in_the_file() -> None:
    """GATEWAY_<SECTION>_<KEY> wins over the file, with the key's type."""
    doc = minimal()
    doc["limits"] = {"max_message_bytes": 1000}
    env = {"GATEWAY_LIMITS_MAX_MESSAGE_BYTES": "2048", "GATEWAY_PROVIDER_LISTEN": "0.0.0.0:5501"}
    settings = load_settings(ServerSettings, doc, base=BASE, env=env)
    assert settings.limits.max_message_bytes == 2048
    assert settings.provider.listen == "0.0.0.0:5501"


def test_environment_value_of_the_wrong_type_is_named() -> None:
    """A malformed override names the environment variable."""
    with pytest.raises(ConfigFileError, match="GATEWAY_LIMITS_DEADLINE_SECONDS"):
        load_settings(
            ServerSettings, minimal(), base=BASE, env={"GATEWAY_LIMITS_DEADLINE_SECONDS": "soon"}
        )


def test_database_url_forms() -> None:
    """A path becomes a SQLite URL; postgresql:// gets the asyncpg driver."""
    assert database_url("log.db", base=BASE) == "sqlite+aiosqlite:////etc/gateway/log.db"
    assert database_url("postgresql://u@h/db", base=BASE) == "postgresql+asyncpg://u@h/db"


@pytest.mark.parametrize(
    ("section", "values", "named"),
    [
        # every staple would be stale before the next one is fetched
        ("ocsp", {"refresh_seconds": 600, "freshness_seconds": 600}, "ocsp.refresh_seconds"),
        ("limits", {"max_configuration_bytes": 1024 * 1024 - 1}, "limits.max_configuration_bytes"),
        ("limits", {"stream_check_seconds": 0}, "limits.stream_check_seconds"),
    ],
)
def test_settings_that_would_fail_silently_are_refused_by_name(
    section: str, values: dict[str, Any], named: str
) -> None:
    doc = minimal()
    doc[section] = values
    with pytest.raises(ConfigFileError, match=named.replace(".", r"\.")):
        load_settings(ServerSettings, doc, base=BASE, env={})


def test_a_short_subject_key_is_refused(tmp_path: Path) -> None:
    """A pseudonym key of fewer than 16 bytes would make subjects' pseudonyms guessable."""
    short = tmp_path / "subject.key"
    short.write_bytes(b"x" * 15)
    with pytest.raises(ConfigFileError, match=r"server\.subject_key: .* holds 15 bytes"):
        load_subject_secret(tmp_path, short)
    short.write_bytes(b"x" * 16)
    assert load_subject_secret(tmp_path, short) == b"x" * 16
