"""string prefix index in C collation

String search compares with COLLATE "C" on PostgreSQL databases whose default collation is
not C (prefix ranges are only meaningful byte-wise); this expression index lets those
comparisons use an index. SQLite and C-collated databases need nothing.

Revision ID: 0007
Revises: 0002
Create Date: 2026-11-22
"""
from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute('CREATE INDEX ix_string_prefix_c ON idx_string (resource_type, param, (value COLLATE "C"))')


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP INDEX IF EXISTS ix_string_prefix_c")
