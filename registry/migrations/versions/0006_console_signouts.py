"""The web console's signed-out sessions, shared by every registry process.

A console session is a sealed cookie; signing out deletes it in the browser and records the
session's id here until the session would have ended, so that no registry process accepts
it again even if it is sent by hand (see `registry.console`).

Revision ID: 0006_console_signouts
Revises: 0005_configuration_admin_seq
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_console_signouts"
down_revision = "0005_configuration_admin_seq"


def upgrade() -> None:
    op.create_table(
        "console_signouts",
        sa.Column("session", sa.String(64), primary_key=True),
        # when the session would have ended (UNIX seconds); past it the row is removed
        sa.Column("ends_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("console_signouts")
