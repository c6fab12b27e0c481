"""Federation: the instances this one federates with, and its outbound approvals.

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
        "federations",
        sa.Column("instance", sa.String(64), primary_key=True),
        sa.Column("anchor", sa.Text, nullable=False),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("since", sa.String(40), nullable=False),
        sa.Column("ended_at", sa.String(40)),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("updated_by", sa.Text, nullable=False),
        sa.Column("revision", sa.Integer, nullable=False),
        sa.Column("created_at", sa.String(40), nullable=False),
        sa.Column("updated_at", sa.String(40), nullable=False),
    )
    op.create_table(
        "outbound_approvals",
        sa.Column("id", sa.String(200), primary_key=True),
        sa.Column("client", sa.String(300), nullable=False),
        sa.Column("client_member", sa.String(200), nullable=False),
        sa.Column("service", sa.String(400), nullable=False),
        sa.Column("purposes", sa.Text, nullable=False),
        sa.Column("agreement", sa.String(200), nullable=False),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("requested_by", sa.Text, nullable=False),
        sa.Column("updated_by", sa.Text, nullable=False),
        sa.Column("approved_at", sa.String(40)),
        sa.Column("revision", sa.Integer, nullable=False),
        sa.Column("created_at", sa.String(40), nullable=False),
        sa.Column("updated_at", sa.String(40), nullable=False),
    )
    for column in ("client", "client_member", "service", "state"):
        op.create_index(f"ix_outbound_approvals_{column}", "outbound_approvals", [column])
