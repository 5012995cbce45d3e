"""token rows of the audit trail stored once per distinct set (service.fhir.token_sets)

An AuditEvent's token rows repeat from one record to the next (nine of a read's thirteen
index rows). For AuditEvent and Provenance a resource now names its set of token rows
(``idx_token_set``) and each distinct set is stored once (``token_set``, ``token_set_row``).
The token rows these types already have move into sets here.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""
from __future__ import annotations

from collections.abc import Iterator

import sqlalchemy as sa
import sqlmodel
from alembic import op

from service.fhir.token_sets import SHARED_TOKEN_TYPES, digest

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_PAGE = 20_000  # token rows read at a time


def upgrade() -> None:
    op.create_table(
        "token_set",
        sa.Column("digest", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.PrimaryKeyConstraint("digest"),
    )
    op.create_table(
        "token_set_row",
        sa.Column("digest", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column("param", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
        sa.Column("system", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("code", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("text", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    )
    op.create_index("ix_token_set_row_lookup", "token_set_row", ["param", "code", "system"])
    op.create_index("ix_token_set_row_set", "token_set_row", ["digest"])
    op.create_table(
        "idx_token_set",
        sa.Column("resource_type", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("resource_id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("digest", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    )
    op.create_index("ix_token_set_lookup", "idx_token_set", ["resource_type", "digest"])
    op.create_index("ix_token_set_owner", "idx_token_set", ["resource_type", "resource_id"])
    bind = op.get_bind()
    for resource_type in sorted(SHARED_TOKEN_TYPES):
        _move_into_sets(bind, resource_type)


def _move_into_sets(bind: sa.Connection, resource_type: str) -> None:
    known = {name for (name,) in bind.execute(sa.text("SELECT digest FROM token_set"))}
    for page in _rows_by_resource(bind, resource_type):
        members, new_rows = [], []
        for resource_id, rows in page:
            name = digest(rows)
            members.append({"t": resource_type, "i": resource_id, "d": name})
            if name not in known:
                known.add(name)
                bind.execute(sa.text("INSERT INTO token_set (digest) VALUES (:d)"), {"d": name})
                new_rows += [{"d": name, **row} for row in rows]
        if new_rows:
            bind.execute(sa.text("INSERT INTO token_set_row (digest, param, system, code, text) "
                                 "VALUES (:d, :param, :system, :code, :text)"), new_rows)
        bind.execute(sa.text("INSERT INTO idx_token_set (resource_type, resource_id, digest) VALUES (:t, :i, :d)"),
                     members)
    bind.execute(sa.text("DELETE FROM idx_token WHERE resource_type = :t"), {"t": resource_type})


def _rows_by_resource(bind: sa.Connection, resource_type: str) -> Iterator[list[tuple[str, list[dict]]]]:
    """Pages of (resource id, its token rows), every resource's rows in one page."""
    query = sa.text("SELECT resource_id, param, system, code, text FROM idx_token "
                    "WHERE resource_type = :t AND resource_id > :after ORDER BY resource_id LIMIT :n")
    after = ""
    while True:
        rows = bind.execute(query, {"t": resource_type, "after": after, "n": _PAGE}).all()
        if not rows:
            return
        grouped: dict[str, list[dict]] = {}
        for resource_id, param, system, code, text in rows:
            grouped.setdefault(resource_id, []).append(
                {"param": param, "system": system, "code": code, "text": text})
        if len(rows) == _PAGE and len(grouped) > 1:  # the last resource's rows may go on: read it again
            grouped.pop(rows[-1][0])
        after = max(grouped)
        yield list(grouped.items())


def downgrade() -> None:
    op.execute(sa.text(
        "INSERT INTO idx_token (resource_type, resource_id, param, system, code, text) "
        "SELECT m.resource_type, m.resource_id, s.param, s.system, s.code, s.text "
        "FROM idx_token_set m JOIN token_set_row s ON s.digest = m.digest"))
    op.drop_index("ix_token_set_owner", table_name="idx_token_set")
    op.drop_index("ix_token_set_lookup", table_name="idx_token_set")
    op.drop_table("idx_token_set")
    op.drop_index("ix_token_set_row_set", table_name="token_set_row")
    op.drop_index("ix_token_set_row_lookup", table_name="token_set_row")
    op.drop_table("token_set_row")
    op.drop_table("token_set")
