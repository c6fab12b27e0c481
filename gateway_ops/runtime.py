"""Process plumbing shared by the long-running commands: logging, event loop, signals,
ready files and settings files."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import signal
import stat
import sys
import tomllib
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import structlog

from gateway.errors import ConfigFileError
from gateway.settings import database_url, load_settings

T = TypeVar("T")

# files and folders a process creates are its owner's only: logs, caches, bundles and keys
# hold personal data or secrets (files 0600, folders 0700)
PRIVATE_UMASK = 0o077


def private_umask() -> None:
    """From now on, everything this process (and its children) creates is owner-only."""
    os.umask(PRIVATE_UMASK)


def restrict_modes(folder: Path | None = None, files: Iterable[Path] = ()) -> list[Path]:
    """Make `folder` (created when missing) and everything under it, and `files` where they
    exist, owner-only: group and other bits are cleared (0644 becomes 0600, 0755 0700).
    Each path tightened is logged; the list of them is returned. Symbolic links are left
    alone (their target is not ours to change). A path open to others that cannot be
    tightened (owned by another user) is a `ConfigFileError`: the process does not start
    with it; one open to its group only is kept with a warning (a Kubernetes Secret mounted
    read-only, read through the pod's fsGroup)."""
    paths: list[Path] = []
    if folder is not None:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        paths.append(folder)
        for root, dirs, names in os.walk(folder):
            paths.extend(Path(root) / name for name in (*dirs, *names))
    paths.extend(files)
    tightened = []
    log = structlog.get_logger("gateway.files")
    for path in paths:
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(mode) or not mode & 0o077:
            continue
        try:
            path.chmod(stat.S_IMODE(mode) & 0o700)
        except OSError as exc:
            if not mode & 0o007:
                # readable by its group only, on a mount we may not change (a Kubernetes
                # Secret read through the pod's fsGroup): kept, and said
                log.warning("file_mode_kept", path=str(path), mode=oct(stat.S_IMODE(mode)))
                continue
            # not ours, say: refuse to run with it readable by others
            raise ConfigFileError(
                f"{path} is readable by others and cannot be made owner-only: {exc}"
            ) from None
        log.warning("file_mode_tightened", path=str(path), was=oct(stat.S_IMODE(mode)))
        tightened.append(path)
    return tightened


def sqlite_files(url: str) -> list[Path]:
    """The files of a SQLite database URL (the database, its WAL, shared memory and journal);
    none for a server database or an in-memory one."""
    if not url.startswith("sqlite"):
        return []
    _, _, database = url.partition(":///")
    database = database.partition("?")[0]
    if not database or database == ":memory:":
        return []
    return [Path(database + suffix) for suffix in ("", "-wal", "-shm", "-journal")]


def restrict_state(
    config: Path, database: str, *, folder: Path | None = None, files: Iterable[Path] = ()
) -> None:
    """Before a serving process starts: make its state owner-only (`restrict_modes`):
    `folder`, the files of its `database` setting (resolved like `database_url`, relative
    to the configuration file's folder) and `files`."""
    url = database_url(database, base=config.resolve().parent)
    restrict_modes(folder, [*sqlite_files(url), *files])


def configure_logging(json_lines: bool | None = None) -> None:
    """Structured logs on stderr: JSON lines when not a terminal, readable otherwise."""
    if json_lines is None:
        json_lines = not sys.stderr.isatty()
    renderer: Any = (
        structlog.processors.JSONRenderer() if json_lines else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def die_with_parent() -> None:
    """When started by a runner (`GATEWAY_PARENT_PID`), get SIGTERM when it dies (Linux)."""
    expected = os.environ.pop("GATEWAY_PARENT_PID", None)  # not for our own children
    if not expected or not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if str(os.getppid()) != expected:  # the runner died before we asked
        os.kill(os.getpid(), signal.SIGTERM)


# the cyclic garbage collector's first threshold (allocations less deallocations between
# collections of the youngest generation; CPython's default is 700). Importing the
# project's libraries allocates hundreds of thousands of objects that live as long as the
# process, and the default threshold collects over them hundreds of times: about a tenth
# of the CPU a process spends starting, and a steady cost per call on the data path.
GC_THRESHOLD = 20_000


def tune_garbage_collector() -> None:
    """Collect the youngest generation every GC_THRESHOLD allocations (see there), the older
    ones at CPython's default ratios."""
    gc.set_threshold(GC_THRESHOLD, 10, 10)


def run(main: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine on uvloop when it is installed, else on asyncio's loop. What exists
    by then (modules, settings, keys) lives as long as the process: it is moved out of the
    collector's reach (`gc.freeze`), so collections no longer walk it. No collection comes
    first: it would cost about 0.08 s of CPU per process to free a hundred-odd objects."""
    gc.freeze()
    try:
        import uvloop

        factory: Any = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())  # type: ignore[arg-type]


def signal_events() -> tuple[asyncio.Event, asyncio.Event]:
    """(stop, reload): set by SIGTERM/SIGINT and SIGHUP respectively."""
    stop, reload = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload.set)
    return stop, reload


def ready_writer(path: Path | None) -> Callable[[dict[str, Any]], None]:
    """A callback that writes the ready document atomically (for supervisors and tests)."""

    def write(info: dict[str, Any]) -> None:
        if path is None:
            return
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({**info, "pid": os.getpid()}))
        os.replace(tmp, path)

    return write


def read_settings(cls: type[T], path: Path) -> T:
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigFileError(f"{path}: {exc}") from None
    try:
        return load_settings(cls, doc, base=path.resolve().parent, env=os.environ)
    except ConfigFileError as exc:
        raise ConfigFileError(f"{path}: {exc}") from None
