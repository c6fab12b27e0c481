"""Files that hold personal data or secrets: created owner-only (0600), whatever the umask.

The processes run with umask 077 (`gateway_ops.runtime.private_umask`); this makes the
files of the message log's neighbourhood (cached configurations, OCSP answers, evidence
bundles, archives) owner-only even when this code runs in a process that did not set it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO


def open_private(path: Path | str) -> BinaryIO:
    """Open `path` for writing, truncated, with mode 0600 (also when it existed wider)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        return os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        raise
