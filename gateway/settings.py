"""Typed settings: a parsed TOML document (and environment overrides) into frozen dataclasses.

Each process describes its configuration file as nested dataclasses; `load_settings`
checks every key and type, rejects unknown keys naming their path (`provider.listn`),
resolves relative paths against the file's folder, and applies environment overrides
of the form `GATEWAY_<SECTION>_<KEY>` (for example `GATEWAY_PROVIDER_LISTEN`). It takes
the document and the environment as arguments; reading the file is the caller's job.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from gateway.errors import ConfigFileError

T = TypeVar("T")


def _convert(value: Any, hint: Any, path: str, base: Path, from_env: bool) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, path, base, from_env)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise ConfigFileError(f"{path}: expected a table")
        return _build(hint, value, path, base, {})  # type: ignore[arg-type]
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ConfigFileError(f"{path}: expected a path")
        p = Path(value).expanduser()
        return p if p.is_absolute() else (base / p)
    if hint is bool:
        if from_env and isinstance(value, str) and value.lower() in ("1", "true", "0", "false"):
            return value.lower() in ("1", "true")
        if not isinstance(value, bool):
            raise ConfigFileError(f"{path}: expected true or false")
        return value
    if hint in (int, float):
        if from_env and isinstance(value, str):
            try:
                value = hint(value)
            except ValueError:
                raise ConfigFileError(f"{path}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigFileError(f"{path}: expected a number")
        if hint is int and not isinstance(value, int):
            raise ConfigFileError(f"{path}: expected an integer")
        return hint(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigFileError(f"{path}: expected a string")
        return value
    if origin is tuple:
        if from_env and isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigFileError(f"{path}: expected a list")
        return tuple(
            _convert(v, args[0], f"{path}[{i}]", base, from_env) for i, v in enumerate(value)
        )
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigFileError(f"{path}: expected a table")
        return {
            str(k): _convert(v, args[1], f"{path}.{k}", base, from_env) for k, v in value.items()
        }
    raise ConfigFileError(f"{path}: unsupported setting type {hint!r}")


def _build(
    cls: type[T], doc: Mapping[str, Any], path: str, base: Path, env: Mapping[str, str]
) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(doc) - set(fields))
    if unknown:
        where = ", ".join(f"{path}.{k}" if path else k for k in unknown)
        raise ConfigFileError(f"unknown setting(s): {where}")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        key = f"{path}.{name}" if path else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            section = doc.get(name, {})
            if not isinstance(section, Mapping):
                raise ConfigFileError(f"{key}: expected a table")
            values[name] = _build(hint, section, key, base, env)  # type: ignore[arg-type]
            continue
        env_name = "GATEWAY_" + key.replace(".", "_").upper()
        if env_name in env:
            values[name] = _convert(env[env_name], hint, env_name, Path.cwd(), True)
        elif name in doc:
            values[name] = _convert(doc[name], hint, key, base, False)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigFileError(f"missing setting: {key}")
    try:
        return cls(**values)
    except (ValueError, TypeError) as exc:  # a settings class that checks itself
        raise ConfigFileError(f"{path or 'settings'}: {exc}") from None


def load_settings(cls: type[T], doc: Mapping[str, Any], *, base: Path, env: Mapping[str, str]) -> T:
    """Build settings of type `cls` from a TOML document; paths resolve against `base`."""
    return _build(cls, doc, "", base, env)


def database_url(value: str, *, base: Path) -> str:
    """An async SQLAlchemy URL from a setting: a URL as is, or a SQLite file path."""
    if "://" in value:
        if value.startswith("postgresql://"):
            return "postgresql+asyncpg://" + value.removeprefix("postgresql://")
        return value
    path = Path(value).expanduser()
    return f"sqlite+aiosqlite:///{path if path.is_absolute() else base / path}"
