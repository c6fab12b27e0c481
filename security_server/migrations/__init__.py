"""The message log's schema migrations (alembic), run by the security server at start-up.

`upgrade` brings a database to the newest revision inside the caller's transaction. The
revisions live in `versions/`; each is written by hand, and a test checks that the newest
one yields exactly the tables of `security_server.message_log.metadata`, on SQLite and
PostgreSQL. The version is kept in its own table (`message_log_version`), so that the
message log may share a PostgreSQL database with the registry. To add a revision: change
`security_server/message_log.py`, then write `versions/NNNN_what.py` with `down_revision`
set to the previous revision.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config

VERSION_TABLE = "message_log_version"


def alembic_config(connection: sa.Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent))
    config.attributes["connection"] = connection
    return config


def upgrade(connection: sa.Connection, revision: str = "head") -> None:
    """Apply every migration up to `revision` over this connection."""
    command.upgrade(alembic_config(connection), revision)
