"""``service.fhir.statements.Prepared``: a Core statement run as a prepared statement on
PostgreSQL, past SQLAlchemy's execution; the same answers as SQLAlchemy gives, on both databases."""

from __future__ import annotations

from uuid import uuid4

import sqlalchemy as sa

from service.fhir import tables
from service.fhir.statements import Prepared

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
