"""Alembic migrations go up (and down and up again) on an empty database of each kind."""

from __future__ import annotations

from pathlib import Path
from uuid import uuid4

import pytest
import sqlalchemy as sa

from service import models  # noqa: F401  (every table module)
from service.fhir import tables
from service.fhir.db import create_engine, is_postgres
from service.fhir.search.dialect import Dialect
from service.migrate import downgrade, include_object, upgrade
from tests.conftest import empty_database


def test_migrations_up_down_up_on_an_empty_database(database_url: str, tmp_path: Path) -> None:
    with empty_database(database_url, tmp_path) as url:
        upgrade(url)
        engine = create_engine(url)
        names = set(sa.inspect(engine).get_table_names())
        assert set(tables.metadata.tables) <= names
        assert "alembic_version" in names
        downgrade(url)
        assert set(tables.metadata.tables).isdisjoint(sa.inspect(engine).get_table_names())
        upgrade(url)
        assert set(tables.metadata.tables) <= set(sa.inspect(engine).get_table_names())
        engine.dispose()


def test_migrated_schema_matches_the_models(engine: sa.Engine) -> None:
    """A model change without a migration would make autogenerate find differences."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"include_object": include_object})
        diff = compare_metadata(context, tables.metadata)
    assert diff == [], f"models and migrations differ (postgres={is_postgres(engine)}): {diff}"


def test_the_c_collation_prefix_index_exists_exactly_where_string_search_uses_it(database_url: str) -> None:
    """``ix_string_prefix_c`` (migrations 0007, 0008) costs every string row written an index
    entry: a database whose collation is code-point ordered (C.UTF-8, the usual case) does not
    have it; one with a linguistic collation (ICU), whose string searches compare
    ``COLLATE "C"``, does."""
    if not database_url.startswith("postgres"):
        pytest.skip("SQLite compares in code-point order (BINARY): string search never needs the index")
    admin = create_engine(database_url).execution_options(isolation_level="AUTOCOMMIT")
    try:
        for collation, linguistic in (("LOCALE 'C.UTF-8'", False),
                                      ("LOCALE_PROVIDER icu ICU_LOCALE 'en' LOCALE 'C.UTF-8'", True)):
            name = f"yilian_mig_{uuid4().hex[:8]}"
            with admin.connect() as conn:
                conn.exec_driver_sql(f'CREATE DATABASE "{name}" TEMPLATE template0 {collation}')
            url = database_url.rsplit("/", 1)[0] + "/" + name
            try:
                upgrade(url)
                engine = create_engine(url)
                with engine.connect() as conn:
                    assert Dialect.for_connection(conn).needs_c_collation is linguistic
                indexes = {ix["name"] for ix in sa.inspect(engine).get_indexes("idx_string")}
                assert ("ix_string_prefix_c" in indexes) is linguistic, (collation, indexes)
                engine.dispose()
            finally:
                with admin.connect() as conn:
                    conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.dispose()
