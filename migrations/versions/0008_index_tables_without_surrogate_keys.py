"""index tables without surrogate keys; the C-collation prefix index only where it is used

Every index row paid for a ``pk`` it was never addressed by: a step of its table's sequence and
an entry in one more b-tree, on each of the ~50 rows a create writes (a Patient's and its audit
records'). A resource's rows are found and replaced through the owner index.

``ix_string_prefix_c`` serves string search only where the database's collation is not
code-point ordered (``search.dialect``); elsewhere (C, C.UTF-8: the usual case) search uses
``ix_string_lookup`` and the other index only cost every string row an entry. It is kept only
where search uses it.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from service.fhir.search.dialect import codepoint_ordered

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

INDEX_TABLES = ("idx_token", "idx_string", "idx_date", "idx_reference", "idx_number", "idx_quantity", "idx_uri")


def upgrade() -> None:
    bind = op.get_bind()
    for table in INDEX_TABLES:
        with op.batch_alter_table(table) as batch:  # SQLite rebuilds the table; PostgreSQL alters it
            batch.drop_column("pk")
    if bind.dialect.name == "postgresql" and codepoint_ordered(bind):
        op.execute("DROP INDEX IF EXISTS ix_string_prefix_c")


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        op.execute('CREATE INDEX IF NOT EXISTS ix_string_prefix_c ON idx_string (resource_type, param, (value COLLATE "C"))')
        for table in INDEX_TABLES:
            op.execute(f"ALTER TABLE {table} ADD COLUMN pk BIGSERIAL PRIMARY KEY")
        return
    for table in INDEX_TABLES:  # an INTEGER PRIMARY KEY is SQLite's rowid: the copy numbers the rows
        with op.batch_alter_table(table, recreate="always") as batch:
            batch.add_column(sa.Column("pk", sa.Integer(), nullable=False, primary_key=True, autoincrement=True))
