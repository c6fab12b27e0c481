"""Registry replicas: each stored configuration version names the admin log entry it
covers and when it was generated.

A registry process that did not publish a version takes it over (instead of publishing
one of its own) only when the database is still at that entry; see `registry.publisher`.
Rows stored before this revision have neither (NULL): the next version is published anew.

Revision ID: 0005_configuration_admin_seq
Revises: 0004_next_auth_certificates
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_configuration_admin_seq"
down_revision = "0004_next_auth_certificates"


def upgrade() -> None:
    # nullable columns: a plain ALTER TABLE ... ADD COLUMN on SQLite and PostgreSQL
    op.add_column("configurations", sa.Column("admin_seq", sa.BigInteger, nullable=True))
    op.add_column("configurations", sa.Column("generated_at", sa.String(40), nullable=True))
