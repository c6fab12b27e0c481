"""alembic's entry point: migrate over the connection `security_server.migrations.upgrade` passes."""

from __future__ import annotations

from alembic import context

from security_server.message_log import metadata
from security_server.migrations import VERSION_TABLE

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run the message log migrations through security_server.migrations.upgrade")
context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=True,
    version_table=VERSION_TABLE,
)
with context.begin_transaction():
    context.run_migrations()
