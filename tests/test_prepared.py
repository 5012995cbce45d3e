"""``service.fhir.statements.Prepared``: a Core statement run as a prepared statement on
PostgreSQL, past SQLAlchemy's execution; the same answers as SQLAlchemy gives, on both databases."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit
from uuid import uuid4

import orjson
import sqlalchemy as sa

from service.fhir import tables
from service.fhir.access import AccessContext
from service.fhir.search.dialect import Dialect
from service.fhir.search.execute import _plan_for, execute_search
from service.fhir.search.parse import base_url_setting, parse_search
from service.fhir.search.sql import Builder
from service.fhir.statements import Prepared
from service.fhir.store import ResourceStore

TOKEN = tables.TokenIndex.__table__
RESOURCE = tables.ResourceRow.__table__


def test_prepared_statements_answer_what_sqlalchemy_answers(engine: sa.Engine) -> None:
    owner = f"prep-{uuid4().hex[:8]}"
    insert = Prepared(TOKEN.insert().values(resource_type="Basic", resource_id=sa.bindparam("i"),
                                            param=sa.bindparam("p"), system="", code=sa.bindparam("c")))
    select = sa.select(TOKEN.c.param, TOKEN.c.code).where(
        TOKEN.c.resource_type == "Basic", TOKEN.c.resource_id == sa.bindparam("i"),
        TOKEN.c.code != "ignored").order_by(TOKEN.c.param)  # literal values ride along as fixed binds
    prepared = Prepared(select)
    update = Prepared(TOKEN.update().where(TOKEN.c.resource_id == sa.bindparam("i"), TOKEN.c.param == "b")
                      .values(code=TOKEN.c.code + "-" + sa.bindparam("suffix")).returning(TOKEN.c.code))
    with engine.begin() as conn:
        assert insert.rows(conn, {"i": owner, "p": "b", "c": "2"}) == []  # no RETURNING: no rows
        insert.rows(conn, {"i": owner, "p": "a", "c": "1"})
        insert.rows(conn, {"i": owner, "p": "c", "c": "ignored"})
        assert prepared.rows(conn, {"i": owner}) == [tuple(r) for r in conn.execute(select, {"i": owner})]
        assert prepared.rows(conn, {"i": owner}) == [("a", "1"), ("b", "2")]
        assert prepared.first(conn, {"i": owner}) == ("a", "1")
        assert prepared.scalar(conn, {"i": owner}) == "a"
        assert prepared.mapping(conn, {"i": owner}) == {"param": "a", "code": "1"}
        assert prepared.first(conn, {"i": "nobody"}) is None and prepared.mapping(conn, {"i": "nobody"}) is None
        assert update.rows(conn, {"i": owner, "suffix": "x"}) == [("2-x",)]
        if engine.dialect.name == "postgresql":  # run as a prepared statement of this connection
            texts = conn.execute(sa.text("SELECT statement FROM pg_prepared_statements")).scalars().all()
            assert any("FROM idx_token" in text and "$1" in text for text in texts), texts
        conn.execute(TOKEN.delete().where(TOKEN.c.resource_id == owner))


def test_only_plain_statements_qualify() -> None:
    """An expanding IN list is rendered per execution, so it cannot be prepared once."""
    by_id = sa.select(RESOURCE.c.id, RESOURCE.c.last_updated).where(RESOURCE.c.id == sa.bindparam("i"))
    assert Prepared.if_plain(by_id) is not None
    assert Prepared.if_plain(sa.select(RESOURCE.c.id).where(RESOURCE.c.id.in_(sa.bindparam("ids", expanding=True)))) is None
    # a number column's conversion depends on its database type: left to SQLAlchemy
    assert Prepared.if_plain(sa.select(sa.cast(RESOURCE.c.seq, sa.Float))) is None


def test_a_search_of_a_kept_shape_runs_its_page_as_a_prepared_statement(engine: sa.Engine) -> None:
    """Searches by identifier (one plan per shape, see search.shapes) skip SQLAlchemy's
    execution on PostgreSQL — it derived the statement's cache key on every call, 16 % of the
    server's CPU for such a search — and still answer as SQLAlchemy does, page after page."""
    store = ResourceStore(engine)
    ctx = AccessContext.internal("test-prepared")
    system, value = "https://example.org/mrn", f"prep-{uuid4().hex[:8]}"
    ids = {store.create(ctx, {"resourceType": "Patient", "identifier": [{"system": system, "value": value}],
                              "name": [{"family": f"F{n}"}]}).resource.id for n in range(3)}
    request = parse_search("Patient", [("identifier", f"{system}|{value}"), ("_count", "2")])
    with store.read_only(ctx) as tx:
        first = execute_search(tx.conn, request)
        assert first.next_link is not None and first.total == 3  # the total: a kept count up to the snapshot
        plan, params = _plan_for(Builder(Dialect.for_connection(tx.conn), base_url=base_url_setting()), request,
                                 None, None)
        postgres = engine.dialect.name == "postgresql"
        assert (plan.prepared_page is not None) is postgres and (plan.prepared_total is not None) is postgres
        assert plan.total(tx.conn, params, 2**62) == 3 == int(tx.conn.execute(plan.count(2**62), params).scalar_one())
        through_sqlalchemy = [tuple(row) for row in tx.conn.execute(plan.page, params)]
        assert plan.page_rows(tx.conn, params) == through_sqlalchemy
        assert {row[0] for row in through_sqlalchemy} <= ids and len(through_sqlalchemy) == 3  # 2 + 1 more
        assert orjson.loads(through_sqlalchemy[0][1])["resourceType"] == "Patient"
        if postgres:  # run as prepared statements of this connection
            texts = tx.conn.execute(sa.text("SELECT statement FROM pg_prepared_statements")).scalars().all()
            assert any("FROM resource_version" in text and "$1" in text and "snapshot" in text for text in texts)
    next_page = parse_search("Patient", [("identifier", f"{system}|{value}"), ("_count", "2"),
                                         *[(k, v) for k, v in _query(first.next_link) if k == "_cursor"]])
    with store.read_only(ctx) as tx:
        second = execute_search(tx.conn, next_page)
    assert {m[1] for m in first.matches} | {m[1] for m in second.matches} == ids
    assert len(first.matches) == 2 and len(second.matches) == 1


def _query(link: str) -> list[tuple[str, str]]:
    return parse_qsl(urlsplit(link).query or link.lstrip("?"))
