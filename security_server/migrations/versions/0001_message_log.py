"""The message log: chained records (one chain per replica), evidence, time-stamps, archives.

The database itself keeps the log append-only: triggers refuse every UPDATE, every
TRUNCATE, and every DELETE except of records (and their time-stamps) that an archive file
registered in `log_archives` already holds, which is how retention prunes; `log_archives`
itself can only grow. Stored bodies (evidence kind "body") may be deleted, as retention
requires: the chain keeps their digests. Logs written before migrations existed (chain
format 3) are not upgraded: they verify with the release that wrote them.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from gateway.audit import RECORD_FIELDS

revision = "0001"
down_revision = None

_BINARY = {"header", "signature"}

APPEND_ONLY = "the message log is append-only"

# table -> the column whose value must be archived before a row may be deleted
_PRUNED_AFTER_ARCHIVING = {"message_log": "seq", "timestamp_batches": "last_seq"}


def upgrade() -> None:
    op.create_table(
        "message_log",
        sa.Column("chain", sa.String(64), primary_key=True),
        sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("prev_hash", sa.LargeBinary(32), nullable=False),
        sa.Column("hash", sa.LargeBinary(32), nullable=False),
        *(
            sa.Column(name, sa.LargeBinary if name in _BINARY else sa.Text, nullable=True)
            for name in RECORD_FIELDS
        ),
    )
    op.create_index("ix_message_log_message_id", "message_log", ["message_id"])
    op.create_index("ix_message_log_subject", "message_log", ["subject_ref", "logged_at"])
    op.create_index("ix_message_log_time", "message_log", ["logged_at", "chain", "seq"])
    op.create_table(
        "log_evidence",
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "timestamp_batches",
        sa.Column("chain", sa.String(64), primary_key=True),
        sa.Column("first_seq", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("last_seq", sa.BigInteger, nullable=False),
        sa.Column("root", sa.LargeBinary(32), nullable=False),
        sa.Column("token", sa.LargeBinary, nullable=False),
        sa.Column("tsa", sa.Text, nullable=False),
        sa.Column("gen_time", sa.Text, nullable=False),
    )
    op.create_table(
        "log_archives",
        sa.Column("chain", sa.String(64), primary_key=True),
        sa.Column("number", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("first_seq", sa.BigInteger, nullable=False),
        sa.Column("last_seq", sa.BigInteger, nullable=False),
        sa.Column("last_hash", sa.LargeBinary(32), nullable=False),
        sa.Column("file_name", sa.Text, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("prev_sha256", sa.String(64), nullable=False),
        sa.Column("stamped_last_seq", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.Text, nullable=False),
    )
    if op.get_bind().dialect.name == "postgresql":
        _postgresql_rules()
    else:
        _sqlite_rules()


def _archived(column: str, old: str) -> str:
    # table and column names are constants of this module, never input
    query = "SELECT COALESCE(MAX(last_seq), 0) FROM log_archives WHERE chain = "
    return f"{old}.{column} <= ({query}{old}.chain)"


def _sqlite_rules() -> None:
    for table in ("message_log", "timestamp_batches", "log_archives", "log_evidence"):
        op.execute(
            f"CREATE TRIGGER {table}_no_update BEFORE UPDATE ON {table} "
            f"BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY}: {table} rows cannot be changed'); END"
        )
    for table, column in _PRUNED_AFTER_ARCHIVING.items():
        op.execute(
            f"CREATE TRIGGER {table}_no_delete BEFORE DELETE ON {table} "
            f"WHEN NOT ({_archived(column, 'OLD')}) "
            f"BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY}: only archived {table} rows may be "
            "deleted'); END"
        )
    op.execute(
        "CREATE TRIGGER log_archives_no_delete BEFORE DELETE ON log_archives "
        f"BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY}: log_archives rows cannot be deleted'); END"
    )
    op.execute(
        "CREATE TRIGGER log_evidence_no_delete BEFORE DELETE ON log_evidence "
        "WHEN OLD.kind <> 'body' BEGIN SELECT RAISE(ABORT, "
        "'the message log is append-only: only bodies may be deleted from log_evidence'); END"
    )


def _postgresql_rules() -> None:
    op.execute(
        f"""
        CREATE FUNCTION message_log_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION '{APPEND_ONLY}: % on % is refused', TG_OP, TG_TABLE_NAME
                USING ERRCODE = 'insufficient_privilege';
        END $$
        """
    )
    for table, column in _PRUNED_AFTER_ARCHIVING.items():
        op.execute(
            f"""
            CREATE FUNCTION {table}_delete_archived() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NOT ({_archived(column, "OLD")}) THEN
                    RAISE EXCEPTION '{APPEND_ONLY}: only archived {table} rows may be deleted'
                        USING ERRCODE = 'insufficient_privilege';
                END IF;
                RETURN OLD;
            END $$
            """
        )
        op.execute(
            f"CREATE TRIGGER {table}_no_delete BEFORE DELETE ON {table} "
            f"FOR EACH ROW EXECUTE FUNCTION {table}_delete_archived()"
        )
    op.execute(
        """
        CREATE FUNCTION log_evidence_delete_bodies() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF OLD.kind <> 'body' THEN
                RAISE EXCEPTION 'the message log is append-only: only bodies may be deleted'
                    USING ERRCODE = 'insufficient_privilege';
            END IF;
            RETURN OLD;
        END $$
        """
    )
    op.execute(
        "CREATE TRIGGER log_evidence_no_delete BEFORE DELETE ON log_evidence "
        "FOR EACH ROW EXECUTE FUNCTION log_evidence_delete_bodies()"
    )
    op.execute(
        "CREATE TRIGGER log_archives_no_delete BEFORE DELETE ON log_archives "
        "FOR EACH ROW EXECUTE FUNCTION message_log_refuse()"
    )
    for table in ("message_log", "timestamp_batches", "log_archives", "log_evidence"):
        op.execute(
            f"CREATE TRIGGER {table}_no_update BEFORE UPDATE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION message_log_refuse()"
        )
        op.execute(
            f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION message_log_refuse()"
        )
