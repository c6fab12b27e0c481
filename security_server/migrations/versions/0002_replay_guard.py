"""The replay guard: message ids accepted by any replica of the server, for the replay window.

Replicas sharing one PostgreSQL log each claim a request's message id here before logging
or forwarding it (`INSERT ... ON CONFLICT DO NOTHING`; no row inserted means another replica
accepted the same envelope first). The table is not part of the hash chain, has no
triggers, and its rows older than the replay window are deleted.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    op.create_table(
        "replay_guard",
        sa.Column("message_id", sa.String(256), primary_key=True),
        sa.Column("first_seen", sa.Text, nullable=False),
        sa.Column("chain", sa.String(64), nullable=False),
    )
    op.create_index("ix_replay_guard_first_seen", "replay_guard", ["first_seen"])
