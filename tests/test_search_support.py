"""Helpers for the search engine tests (no tests here).

``MiniStore`` writes resources the way the real store does (resource + resource_version +
index rows from ``index_resource``) so the engine can be tested without depending on
``service/fhir/store.py``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from service.fhir import tables, token_sets
from service.fhir.db import write_transaction
from service.fhir.indexing import index_resource
from service.fhir.search import SearchPage, execute_search, find_matches, parse_search

R = tables.ResourceRow.__table__
V = tables.ResourceVersion.__table__
INDEXES = (
    ("tokens", tables.TokenIndex.__table__),
    ("strings", tables.StringIndex.__table__),
    ("dates", tables.DateIndex.__table__),
    ("references", tables.ReferenceIndex.__table__),
    ("numbers", tables.NumberIndex.__table__),
    ("quantities", tables.QuantityIndex.__table__),
    ("uris", tables.UriIndex.__table__),
    ("token_sets", tables.TokenSetIndex.__table__),
)


def fhir_instant(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class MiniStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # -- writes --------------------------------------------------------------------------------

    def put(self, resource: dict[str, Any], *, at: datetime | None = None) -> dict[str, Any]:
        """Create or update ``resource`` (which must carry resourceType and id)."""
        with write_transaction(self.engine) as conn:
            return self.put_in(conn, resource, at=at)

    def put_all(self, resources: list[dict[str, Any]]) -> None:
        with write_transaction(self.engine) as conn:
            for resource in resources:
                self.put_in(conn, resource)

    def put_in(self, conn: sa.Connection, resource: dict[str, Any], *, at: datetime | None = None) -> dict[str, Any]:
        resource = dict(resource)
        rt, rid = resource["resourceType"], resource["id"]
        now = at or datetime.now(UTC)
        current = conn.execute(sa.select(R.c.version_id).where(R.c.resource_type == rt, R.c.id == rid)).scalar()
        version = (current or 0) + 1
        resource["meta"] = {**resource.get("meta", {}), "versionId": str(version), "lastUpdated": fhir_instant(now)}
        seq = conn.execute(
            V.insert().returning(V.c.seq),
            {"resource_type": rt, "id": rid, "version_id": version, "last_updated": now,
             "method": "PUT" if current else "POST", "deleted": False, "content": resource},
        ).scalar_one()
        if current is None:
            conn.execute(R.insert(), {"resource_type": rt, "id": rid, "version_id": version, "seq": seq,
                                      "created_seq": seq, "last_updated": now, "deleted": False})
        else:
            conn.execute(R.update().where(R.c.resource_type == rt, R.c.id == rid)
                         .values(version_id=version, seq=seq, last_updated=now, deleted=False))
            self._clear(conn, rt, rid)
        rows = index_resource(resource)
        sets: token_sets.TokenSets = {}
        token_sets.share(rt, rows, sets)  # AuditEvent, Provenance: their token rows as a set
        for name, set_rows in sets.items():
            if conn.execute(sa.select(token_sets.SET.c.digest).where(token_sets.SET.c.digest == name)).first() is None:
                conn.execute(token_sets.SET.insert(), {"digest": name})
                conn.execute(token_sets.SET_ROW.insert(), [{"digest": name, **row} for row in set_rows])
        for attribute, table in INDEXES:
            entries = getattr(rows, attribute)
            if entries:
                conn.execute(table.insert(), [{"resource_type": rt, "resource_id": rid, **e} for e in entries])
        return resource

    def delete(self, resource_type: str, resource_id: str) -> None:
        with write_transaction(self.engine) as conn:
            now = datetime.now(UTC)
            version = conn.execute(sa.select(R.c.version_id).where(
                R.c.resource_type == resource_type, R.c.id == resource_id)).scalar_one() + 1
            seq = conn.execute(
                V.insert().returning(V.c.seq),
                {"resource_type": resource_type, "id": resource_id, "version_id": version, "last_updated": now,
                 "method": "DELETE", "deleted": True, "content": None},
            ).scalar_one()
            conn.execute(R.update().where(R.c.resource_type == resource_type, R.c.id == resource_id)
                         .values(version_id=version, seq=seq, last_updated=now, deleted=True))
            self._clear(conn, resource_type, resource_id)

    @staticmethod
    def _clear(conn: sa.Connection, resource_type: str, resource_id: str) -> None:
        for _, table in INDEXES:
            conn.execute(table.delete().where(table.c.resource_type == resource_type,
                                              table.c.resource_id == resource_id))

    # -- reads ---------------------------------------------------------------------------------

    def search(self, resource_type: str, query: str | list[tuple[str, str]] = "", *, strict: bool = False,
               visible=None) -> SearchPage:  # type: ignore[no-untyped-def]
        params = parse_qsl(query, keep_blank_values=True) if isinstance(query, str) else query
        request = parse_search(resource_type, params, strict=strict)
        with self.engine.connect() as conn:
            return execute_search(conn, request, visible=visible)

    def ids(self, resource_type: str, query: str | list[tuple[str, str]] = "", **kw: Any) -> list[str]:
        """Ids on the first page (``_count`` defaults to 100 here so that it is the whole result)."""
        if isinstance(query, str):
            query = parse_qsl(query, keep_blank_values=True)
        if not any(name == "_count" for name, _ in query):
            query = [*query, ("_count", "100")]
        return [rid for _, rid, _ in self.search(resource_type, query, **kw).matches]

    def id_set(self, resource_type: str, query: str | list[tuple[str, str]] = "", **kw: Any) -> set[str]:
        return set(self.ids(resource_type, query, **kw))

    def find(self, resource_type: str, query: str, limit: int = 2) -> list[str]:
        with self.engine.connect() as conn:
            return find_matches(conn, resource_type, query, limit=limit)


def parse_json(text: str) -> Any:
    return orjson.loads(text)
