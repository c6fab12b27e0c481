"""The first schema: catalogue, agreements, admin log and published configurations.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "members",
        sa.Column("id", sa.String(200), primary_key=True),
        sa.Column("name", sa.String(500), nullable=False),
        sa.Column("created_at", sa.String(40), nullable=False),
    )
    op.create_table(
        "subsystems",
        sa.Column("id", sa.String(300), primary_key=True),
        sa.Column("member", sa.String(200), sa.ForeignKey("members.id"), nullable=False),
        sa.Column("created_at", sa.String(40), nullable=False),
    )
    op.create_index("ix_subsystems_member", "subsystems", ["member"])
    op.create_table(
        "security_servers",
        sa.Column("id", sa.String(300), primary_key=True),
        sa.Column("member", sa.String(200), sa.ForeignKey("members.id"), nullable=False),
        sa.Column("address", sa.String(300), nullable=False),
        sa.Column("auth_certificate", sa.LargeBinary, nullable=False),
        sa.Column("subsystems", sa.Text, nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("submitted_at", sa.String(40), nullable=False),
    )
    op.create_index("ix_security_servers_member", "security_servers", ["member"])
    op.create_table(
        "services",
        sa.Column("id", sa.String(400), primary_key=True),
        sa.Column("subsystem", sa.String(300), nullable=False),
        sa.Column("member", sa.String(200), sa.ForeignKey("members.id"), nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("methods", sa.Text, nullable=False),
        sa.Column("interface", sa.Text, nullable=False),
        sa.Column("data_categories", sa.Text, nullable=False),
        sa.Column("legal_basis", sa.Text, nullable=False),
        sa.Column("contact", sa.String(500), nullable=False),
    )
    op.create_index("ix_services_subsystem", "services", ["subsystem"])
    op.create_index("ix_services_member", "services", ["member"])
    op.create_table(
        "agreements",
        sa.Column("id", sa.String(200), primary_key=True),
        sa.Column("client", sa.String(300), nullable=False),
        sa.Column("client_member", sa.String(200), nullable=False),
        sa.Column("service", sa.String(400), nullable=False),
        sa.Column("provider_member", sa.String(200), nullable=False),
        sa.Column("purposes", sa.Text, nullable=False),
        sa.Column("legal_basis_kind", sa.String(20)),
        sa.Column("legal_basis_reference", sa.Text),
        sa.Column("data_categories", sa.Text, nullable=False),
        sa.Column("valid_from", sa.String(40), nullable=False),
        sa.Column("valid_until", sa.String(40)),
        sa.Column("rate_limit_requests", sa.Integer),
        sa.Column("rate_limit_per_seconds", sa.Integer),
        sa.Column("state", sa.String(30), nullable=False),
        sa.Column("revision", sa.Integer, nullable=False),
        sa.Column("created_at", sa.String(40), nullable=False),
        sa.Column("updated_at", sa.String(40), nullable=False),
    )
    for column in ("client", "client_member", "service", "provider_member", "state"):
        op.create_index(f"ix_agreements_{column}", "agreements", [column])
    op.create_table(
        "admin_log",
        sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
        *(
            sa.Column(name, sa.Text)
            for name in (
                "logged_at",
                "actor",
                "role",
                "action",
                "target",
                "from_state",
                "to_state",
                "reason",
                "details",
            )
        ),
        sa.Column("members", sa.Text, nullable=False),
        sa.Column("prev_hash", sa.LargeBinary, nullable=False),
        sa.Column("hash", sa.LargeBinary, nullable=False),
    )
    head = op.create_table(
        "admin_log_head",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("next_seq", sa.BigInteger, nullable=False),
        sa.Column("last_hash", sa.LargeBinary, nullable=False),
    )
    op.bulk_insert(head, [{"id": 1, "next_seq": 1, "last_hash": bytes(32)}])
    op.create_table(
        "configurations",
        sa.Column("version", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("content", sa.LargeBinary, nullable=False),
        sa.Column("signature", sa.LargeBinary, nullable=False),
        sa.Column("signer_certificate", sa.LargeBinary, nullable=False),
    )
