"""PostgreSQL: the write path's statements, written by hand, one statement per write.

Through SQLAlchemy a create cost five statements (version, pointer, index rows ...) and as
many round trips, each compiled, converted and adapted in Python. Here a create of one or
many resources is *one* statement, an update another (a deletion's index rows a third):
version rows, pointers and index rows together, as data-modifying CTEs. Each statement's text never changes, so psycopg sends it as
a prepared statement (parsed once per connection; PostgreSQL still re-plans it at each bind,
~0.3 ms, as long as it judges custom plans cheaper) and its placeholders are PostgreSQL's own
(``$1``: a raw cursor, nothing to parse in Python). The rows travel as JSON
documents (``jsonb_to_recordset``): serialised by orjson, parsed by PostgreSQL, both in C;
the stored JSON of each resource is spliced in as the bytes we already have.

The sub-statements of one statement see the same snapshot and none sees another's rows,
which is what an update needs: the DELETE of the old index rows cannot touch the new ones.
SQLite keeps the SQLAlchemy path in ``store.py`` (it runs in process, there are no round trips
to save).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

import orjson
import sqlalchemy as sa

from service.fhir import tables
from service.fhir.db import execute_prepared, hold
from service.fhir.indexing import IndexRows
from service.fhir.token_sets import TokenSets

INDEX_TARGETS = tables.INDEX_TARGETS

#: Columns that are never NULL but may be absent from an index row ("" = no system), as SQL
#: literals (the SQLite write path in ``store`` uses them too).
NOT_NULL_DEFAULTS = {"system": "''"}


@dataclass(frozen=True)
class NewVersion:
    """One version to store: its JSON exactly as it will be read back."""

    resource_type: str
    id: str
    method: str
    content: bytes


def _sql_type(column: sa.Column) -> str:
    if isinstance(column.type, sa.Integer):  # BigInteger included
        return "bigint"
    return "float8" if isinstance(column.type, sa.Float) else "text"


def _index_columns(table: sa.Table) -> tuple[sa.Column, ...]:
    return tuple(table.columns)


def _insert_index_rows(table: sa.Table, document: str, where: str = "") -> str:
    """INSERT the rows under each owner's ``'<attribute>'`` of ``document`` (a JSON array of
    ``{t, i, tokens: [...], strings: [...], ...}``, see :func:`index_document`) into ``table``,
    those satisfying ``where`` (on the owner ``o``) when given."""
    columns = _index_columns(table)
    attribute = next(a for a, t in INDEX_TARGETS if t is table)
    owner = {"resource_type": "o.t", "resource_id": "o.i"}
    names = ", ".join(c.name for c in columns)
    values = ", ".join(owner[c.name] if c.name in owner
                       else f"coalesce(x.{c.name}, {NOT_NULL_DEFAULTS[c.name]})" if c.name in NOT_NULL_DEFAULTS
                       else f"x.{c.name}" for c in columns)
    record = ", ".join(f"{c.name} {_sql_type(c)}" for c in columns if c.name not in owner)
    return (f"INSERT INTO {table.name} ({names}) SELECT {values} "
            f'FROM jsonb_to_recordset({document}) AS o(t text, i text, "{attribute}" jsonb) '
            f'CROSS JOIN LATERAL jsonb_to_recordset(o."{attribute}") AS x({record})'
            + (f" WHERE {where}" if where else ""))


def _index_ctes(document: str, where: str = "", prefix: str = "") -> list[str]:
    return [f"{prefix}i{n} AS ({_insert_index_rows(table, document, where)})"
            for n, (_, table) in enumerate(INDEX_TARGETS)]


def _delete_ctes(owned: str) -> list[str]:
    """DELETE the index rows of type $1 whose ``resource_id`` satisfies ``owned``, every table."""
    return [f"d{n} AS (DELETE FROM {table.name} WHERE resource_type = $1 AND {owned})"
            for n, (_, table) in enumerate(INDEX_TARGETS)]


@functools.cache
def create_ctes(prefix: str = "", first: int = 1) -> tuple[str, ...]:
    """The CTEs of a create: versions (1), pointers and index rows of many resources, named
    after ``prefix``, reading ${first} the versions as a JSON array of {t, i, m, c},
    ${first + 1} their lastUpdated, ${first + 2} the index rows as {tokens: [...], ...}.
    Cached: a held create asks for them on every request."""
    versions, updated, rows = (f"${first + k}" for k in range(3))
    return (
        f"{prefix}v AS (INSERT INTO resource_version (resource_type, id, version_id, last_updated, method, deleted, "
        f"content) SELECT x.t, x.i, 1, {updated}, x.m, false, x.c "
        f"FROM jsonb_to_recordset({versions}::jsonb) AS x(t text, i text, m text, c jsonb) "
        "RETURNING resource_type, id, seq)",
        f"{prefix}p AS (INSERT INTO resource (resource_type, id, version_id, seq, created_seq, last_updated, deleted) "
        f"SELECT resource_type, id, 1, seq, seq, {updated}, false FROM {prefix}v)",
        *_index_ctes(f"{rows}::jsonb", prefix=prefix),
    )


#: Create (see create_ctes), answering the seq of each version.
CREATE_SQL = "WITH " + ", ".join(create_ctes()) + " SELECT resource_type, id, seq FROM v"

#: Create unless the id is taken meanwhile (PUT to a new id): as CREATE_SQL for one resource,
#: but nothing is written when another transaction has created the id since this one looked
#: (ON CONFLICT waits for that transaction, then does nothing). Answers its seq, or no row.
CREATE_IF_ABSENT_SQL = (
    "WITH v AS (INSERT INTO resource_version (resource_type, id, version_id, last_updated, method, deleted, content) "
    "SELECT x.t, x.i, 1, $2, x.m, false, x.c FROM jsonb_to_recordset($1::jsonb) AS x(t text, i text, m text, c jsonb) "
    "ON CONFLICT (resource_type, id, version_id) DO NOTHING RETURNING resource_type, id, seq), "
    "p AS (INSERT INTO resource (resource_type, id, version_id, seq, created_seq, last_updated, deleted) "
    "SELECT resource_type, id, 1, seq, seq, $2, false FROM v ON CONFLICT DO NOTHING RETURNING resource_type, id), "
    + ", ".join(_index_ctes("$3::jsonb", "EXISTS (SELECT 1 FROM p WHERE p.resource_type = o.t AND p.id = o.i)"))
    + " SELECT v.seq, p.id IS NOT NULL FROM v LEFT JOIN p USING (resource_type, id)"
)

#: Update: a new version of one resource whose pointer is at version $7 (the caller holds its
#: row lock), its index rows replaced. $1 type, $2 id, $3 version, $4 lastUpdated, $5 method,
#: $6 JSON, $7 expected current version, $8 index rows. Answers (seq, pointers moved).
UPDATE_SQL = (
    "WITH v AS (INSERT INTO resource_version (resource_type, id, version_id, last_updated, method, deleted, content) "
    "VALUES ($1, $2, $3, $4, $5, false, $6::jsonb) RETURNING seq), "
    "p AS (UPDATE resource SET version_id = $3, seq = v.seq, last_updated = $4, deleted = false FROM v "
    "WHERE resource.resource_type = $1 AND resource.id = $2 AND resource.version_id = $7 RETURNING 1), "
    + ", ".join(_delete_ctes("resource_id = $2"))
    + ", " + ", ".join(_index_ctes("$8::jsonb"))
    + " SELECT (SELECT seq FROM v), (SELECT count(*) FROM p)"
)


@functools.cache
def token_set_ctes(prefix: str = "", first: int = 1) -> tuple[str, ...]:
    """The CTEs that write the token sets ${first} (a JSON array of {d: digest, rows: [...]},
    see ``token_sets``) not written yet: a set's rows are written by whoever names it first.
    A transaction naming a set another one is writing waits here for that one's outcome."""
    sets = f"jsonb_to_recordset(${first}::jsonb) AS x(d text, rows jsonb)"
    row = "y(param text, system text, code text, text text)"
    return (
        f"{prefix}ts AS (INSERT INTO token_set (digest) SELECT x.d FROM {sets} "
        "ON CONFLICT DO NOTHING RETURNING digest)",
        f"{prefix}tr AS (INSERT INTO token_set_row (digest, param, system, code, text) "
        f"SELECT x.d, y.param, coalesce(y.system, ''), y.code, y.text FROM {sets} "
        f"CROSS JOIN LATERAL jsonb_to_recordset(x.rows) AS {row} WHERE x.d IN (SELECT digest FROM {prefix}ts))",
    )


#: The token sets (see token_set_ctes) as a statement of their own.
TOKEN_SET_SQL = "WITH " + ", ".join(token_set_ctes()) + " SELECT 1"


def write_token_sets(conn: sa.Connection, sets: TokenSets) -> None:
    """Write the token sets that ``conn``'s next index rows name, unless they exist: held back
    with the writes that follow when the transaction has sent nothing yet (``db.hold``)."""
    if not sets:
        return
    params = (orjson.dumps([{"d": name, "rows": rows} for name, rows in sets.items()]).decode(),)
    if not hold(conn, token_set_ctes, params):
        execute_prepared(conn, TOKEN_SET_SQL, params)


#: Deletion: the index rows of resources $2 (ids) of type $1, from every table at once.
CLEAR_INDEX_SQL = "WITH " + ", ".join(_delete_ctes("resource_id = ANY($2::text[])")) + " SELECT 1"


def versions_document(versions: Iterable[NewVersion]) -> bytes:
    """The JSON array CREATE_SQL reads, with each stored JSON spliced in as it is."""
    parts = [orjson.dumps({"t": v.resource_type, "i": v.id, "m": v.method})[:-1] + b',"c":' + v.content + b"}"
             for v in versions]
    return b"[" + b",".join(parts) + b"]"


#: The index rows of resources, each with its owner's type and id.
OwnedRows = Sequence[tuple[str, str, IndexRows]]


def index_document(owned: OwnedRows) -> str:
    """The JSON array the index CTEs read: per resource ``{t, i, tokens: [...], ...}``, the
    owner written once, not on each of its ~20 rows (that was half of the document's bytes,
    all of it parsed by PostgreSQL)."""
    parts = [orjson.dumps({"t": t, "i": i})[:-1] + b"," + orjson.dumps(rows)[1:] for t, i, rows in owned]
    return (b"[" + b",".join(parts) + b"]").decode()


def create(conn: sa.Connection, versions: Sequence[NewVersion], last_updated: datetime,
           index_rows: OwnedRows) -> dict[tuple[str, str], int]:
    """Store version 1 of each resource, its pointer and its index rows; their seqs by (type, id).

    When the transaction has sent nothing yet, the create is held back (``db.hold``) and sent
    with whatever else is held, before the transaction's next statement or as the whole
    transaction at its end; the seqs are then unknown (an empty mapping)."""
    params = (versions_document(versions).decode(), last_updated, index_document(index_rows))
    if hold(conn, create_ctes, params):
        return {}
    rows = execute_prepared(conn, CREATE_SQL, params)
    return {(t, i): seq for t, i, seq in rows}


def create_if_absent(conn: sa.Connection, version: NewVersion, last_updated: datetime,
                     index_rows: OwnedRows) -> int | None:
    """Version 1 of a resource at an id the caller chose: its seq, or None (and nothing
    written) when another transaction created that id first."""
    rows = execute_prepared(conn, CREATE_IF_ABSENT_SQL, (
        versions_document([version]).decode(), last_updated, index_document(index_rows)))
    if not rows:
        return None
    [(seq, inserted)] = rows
    if not inserted:  # a version 1 without its pointer: cannot happen, every create writes both
        raise RuntimeError(f"{version.resource_type}/{version.id} has a pointer but no version 1")
    return seq


def update(conn: sa.Connection, version: NewVersion, *, version_id: int, expected_version: int,
           last_updated: datetime, index_rows: OwnedRows) -> tuple[int, bool]:
    """Store a new version, move the pointer from ``expected_version`` and replace the index
    rows; (seq, whether the pointer moved)."""
    [(seq, moved)] = execute_prepared(conn, UPDATE_SQL, (
        version.resource_type, version.id, version_id, last_updated, version.method, version.content.decode(),
        expected_version, index_document(index_rows)))
    return seq, moved == 1


def clear_index(conn: sa.Connection, resource_type: str, resource_ids: list[str]) -> None:
    execute_prepared(conn, CLEAR_INDEX_SQL, (resource_type, resource_ids))
