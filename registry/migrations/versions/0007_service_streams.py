"""Streaming methods in the catalogue: each service lists which of its methods stream, and
how (server, client or bidirectional), so that a consumer security server takes such a
call as a stream without the provider's `.proto`.

Revision ID: 0007_service_streams
Revises: 0006_console_signouts
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_service_streams"
down_revision = "0006_console_signouts"


def upgrade() -> None:
    # a JSON object {method path: kind}; services registered before have none
    op.add_column("services", sa.Column("streams", sa.Text, nullable=False, server_default="{}"))


def downgrade() -> None:
    op.drop_column("services", "streams")
