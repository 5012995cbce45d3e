"""Token rows shared by many resources: how the audit trail's token parameters are stored.

Every FHIR interaction leaves an AuditEvent, every write a Provenance, and most of their
token rows are the same from one record to the next: an AuditEvent of a read has nine (type,
subtype, action, outcome, site, entity-type, entity-role, and the client as ``altid`` and
``agent:identifier``), identical for every read the same client makes. Stored one row each,
they were two thirds of the audit trail's index rows and of what storing an AuditEvent cost
the database.

For the types in :data:`SHARED_TOKEN_TYPES` the token rows of a resource are stored once per
distinct combination instead: a *set* (``token_set_row``), named by a digest of its rows
(``token_set``), and the resource gets one ``idx_token_set`` row naming its set. A set is
written by the first resource that has it, in that resource's transaction, and never
changes; two transactions writing the same new set at once are fine (the second finds the
name taken, waits for the first to commit and writes nothing). Purging the audit trail
removes the resources' ``idx_token_set`` rows; the sets, a few hundred rows, stay.

Search sees the same columns either way: ``idx_token`` for most types and, for these, the
join of a resource's ``idx_token_set`` row with its set's rows (:func:`shared_rows`).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable

import orjson
import sqlalchemy as sa

from service.fhir import tables
from service.fhir.indexing import IndexRows

#: The types whose token rows are stored as shared sets: written for nearly every request,
#: never changed, their token values repeating from one resource to the next.
SHARED_TOKEN_TYPES = frozenset({"AuditEvent", "Provenance"})

TOKEN: sa.Table = tables.TokenIndex.__table__  # type: ignore[attr-defined]
MEMBER: sa.Table = tables.TokenSetIndex.__table__  # type: ignore[attr-defined]
SET: sa.Table = tables.TokenSet.__table__  # type: ignore[attr-defined]
SET_ROW: sa.Table = tables.TokenSetRow.__table__  # type: ignore[attr-defined]

#: The sets some resources are about to be written with: their rows by digest.
TokenSets = dict[str, list[dict]]


def digest(tokens: Iterable[dict]) -> str:
    """The name of a set of token rows: the same for the same rows in any order."""
    lines = sorted(orjson.dumps([t["param"], t["system"], t["code"], t["text"]]) for t in tokens)
    return hashlib.blake2b(b"\n".join(lines), digest_size=16).hexdigest()


def share(resource_type: str, rows: IndexRows, sets: TokenSets) -> None:
    """For a type whose token rows are shared, put ``rows.tokens`` into a set: ``rows`` then
    names the set (``token_sets``) instead, and ``sets`` holds the set's rows to write."""
    if resource_type not in SHARED_TOKEN_TYPES or not rows.tokens:
        return
    name = digest(rows.tokens)
    sets.setdefault(name, rows.tokens)
    rows.token_sets = [{"digest": name}]
    rows.tokens = []


def token_rows(resource_type: str) -> sa.FromClause:
    """The token rows of ``resource_type`` as an anonymous FROM with the columns of
    ``idx_token`` (resource_type, resource_id, param, system, code, text)."""
    return shared_rows(None) if resource_type in SHARED_TOKEN_TYPES else TOKEN.alias()


@functools.lru_cache(maxsize=4096)
def named_shared_rows(name: str) -> sa.Subquery:
    """:func:`shared_rows` named ``name``, built once per name (the search layer's aliases)."""
    subquery = shared_rows(name)
    subquery.c  # noqa: B018  (build the column collection now, not racily on first use)
    return subquery


def shared_rows(name: str | None) -> sa.Subquery:
    """The token rows of the shared-set types with the columns of ``idx_token``: a derived
    table both databases flatten into a join, so that a search by ``param`` and ``code`` finds
    the sets in ``ix_token_set_row_lookup`` and their members in ``ix_token_set_lookup``."""
    member = MEMBER.alias(f"{name}_m" if name else None)
    row = SET_ROW.alias(f"{name}_s" if name else None)
    query = (sa.select(member.c.resource_type, member.c.resource_id, row.c.param, row.c.system, row.c.code,
                       row.c.text)
             .join_from(member, row, row.c.digest == member.c.digest))
    return query.subquery(name)
