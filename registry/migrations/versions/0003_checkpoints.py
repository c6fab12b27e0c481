"""Checkpoints: the signed chain heads of security servers' message logs, append-only.

The database itself refuses every UPDATE and DELETE of a checkpoint (triggers), as the
message log's own migration does for the log.

Revision ID: 0003_checkpoints
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_checkpoints"
down_revision = "0002"

APPEND_ONLY = "checkpoints are append-only"


def upgrade() -> None:
    op.create_table(
        "checkpoints",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("server", sa.String(300), nullable=False),
        sa.Column("member", sa.String(200), nullable=False),
        sa.Column("chain", sa.String(64), nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("head", sa.LargeBinary(32), nullable=False),
        sa.Column("server_time", sa.String(40), nullable=False),
        sa.Column("received_at", sa.String(40), nullable=False),
        sa.Column("content", sa.LargeBinary, nullable=False),
        sa.Column("signature", sa.LargeBinary, nullable=False),
    )
    op.create_index("ix_checkpoints_member", "checkpoints", ["member"])
    op.create_index("ix_checkpoints_server_chain_seq", "checkpoints", ["server", "chain", "seq"])
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            f"""
            CREATE FUNCTION checkpoints_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                RAISE EXCEPTION '{APPEND_ONLY}: % on % is refused', TG_OP, TG_TABLE_NAME
                    USING ERRCODE = 'insufficient_privilege';
            END $$
            """
        )
        op.execute(
            "CREATE TRIGGER checkpoints_no_change BEFORE UPDATE OR DELETE ON checkpoints "
            "FOR EACH ROW EXECUTE FUNCTION checkpoints_refuse()"
        )
        op.execute(
            "CREATE TRIGGER checkpoints_no_truncate BEFORE TRUNCATE ON checkpoints "
            "FOR EACH STATEMENT EXECUTE FUNCTION checkpoints_refuse()"
        )
    else:
        for action in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER checkpoints_no_{action.lower()} BEFORE {action} ON checkpoints "
                f"BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY}: {action} is refused'); END"
            )


def downgrade() -> None:
    op.drop_table("checkpoints")
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION checkpoints_refuse()")
