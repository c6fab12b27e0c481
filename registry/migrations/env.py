"""alembic's entry point: migrate over the connection `registry.migrations.upgrade` passes."""

from __future__ import annotations

from alembic import context

from registry.store import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run the registry migrations through registry.migrations.upgrade")
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
