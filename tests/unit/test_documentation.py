"""The README documents every error code and every setting, so they cannot drift apart."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from gateway.errors import STATUS_BY_CODE, Code
from registry.main import RegistrySettings
from security_server.settings import ServerSettings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


@pytest.mark.parametrize("code", list(Code))
def test_every_error_code_is_documented_with_its_status(code: Code) -> None:
    """Each stable code appears in the README's table with its gRPC status."""
    assert f"| `{code.value}` | {STATUS_BY_CODE[code].value} |" in README


def _keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            keys += _keys(hint, f"{prefix}{f.name}.")  # type: ignore[arg-type]
        elif typing.get_origin(hint) is dict:
            keys.append(f'{prefix}{f.name}."')
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


@pytest.mark.parametrize("key", _keys(ServerSettings) + _keys(RegistrySettings))
def test_every_setting_is_documented(key: str) -> None:
    """Each settings key appears in the README's configuration tables."""
    assert f"`{key}" in README
