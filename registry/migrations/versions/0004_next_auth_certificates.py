"""Renewal: the authentication certificates a security server registers after its first.

Each waits for a registry administrator's approval, is published beside the server's
first certificate once approved, and replaces it when the old one is retired.

Revision ID: 0004_next_auth_certificates
Revises: 0003_checkpoints
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_next_auth_certificates"
down_revision = "0003_checkpoints"


def upgrade() -> None:
    op.create_table(
        "next_auth_certificates",
        # SHA-256 of the DER, hex: one certificate is registered once, for one server
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("server", sa.String(300), sa.ForeignKey("security_servers.id"), nullable=False),
        sa.Column("certificate", sa.LargeBinary, nullable=False),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("submitted_at", sa.String(40), nullable=False),
    )
    op.create_index("ix_next_auth_certificates_server", "next_auth_certificates", ["server"])
