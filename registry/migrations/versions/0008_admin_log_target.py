"""An index of the admin log by target: an agreement's history and the four-eyes check of
each approval read the entries about one agreement, and scanned the whole log without it
(hundreds of thousands of entries at a country's scale).

Revision ID: 0008_admin_log_target
Revises: 0007_service_streams
"""

from __future__ import annotations

from alembic import op

revision = "0008_admin_log_target"
down_revision = "0007_service_streams"


def upgrade() -> None:
    op.create_index("ix_admin_log_target", "admin_log", ["target"])


def downgrade() -> None:
    op.drop_index("ix_admin_log_target", table_name="admin_log")
