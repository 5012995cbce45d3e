"""Shared fixtures. Every test module runs on SQLite, or on PostgreSQL when
``YILIAN_TEST_DATABASE_URL`` names one (CI runs the suite once per database).

On PostgreSQL each run creates its own database next to the named one
(``<name>_run_<pid>_<random>``) and drops it at the end, so that two runs on one machine —
two developers, or a benchmark next to CI — never touch each other's data. A run killed
before its end leaves that database behind (``DROP DATABASE`` it by hand).

A run told to use PostgreSQL that cannot reach it fails: it never silently skips.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from uuid import uuid4

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from sqlalchemy.engine import Engine

from service.app import create_app
from service.config import Settings
from service.fhir import tables
from service.fhir.db import create_engine
from service.migrate import upgrade
from service.security.oauth.config import SecuritySettings

BASE = "http://testserver/fhir"

TEST_DATABASE_URL = os.environ.get("YILIAN_TEST_DATABASE_URL", "")

# The suite runs in development mode (YILIAN_AUTH=off) unless a test asks for authorization:
# the FHIR, domain and loader tests exercise the store, not OAuth, and build their own
# Settings in places. The security tests pass auth="on" explicitly (``auth_app`` below).
os.environ.setdefault("YILIAN_AUTH", "off")


def _database_url(tmp_dir: Path) -> str:
    return TEST_DATABASE_URL or f"sqlite:///{tmp_dir / 'yilian-test.db'}"


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = _database_url(tmp_path_factory.mktemp("db"))
    if not url.startswith("postgres"):
        yield url
        return
    with postgres_database(url, f"{url.rsplit('/', 1)[1]}_run_{os.getpid()}_{uuid4().hex[:6]}") as run_url:
        yield run_url


@contextmanager
def postgres_database(url: str, name: str) -> Iterator[str]:
    """A new database ``name`` beside the one ``url`` names (its URL), dropped afterwards."""
    admin = create_engine(url, pool_size=1).execution_options(isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except Exception as exc:  # a PostgreSQL we were told to use must be there
        admin.dispose()
        pytest.fail(f"cannot create a test database on {url}: {exc}", pytrace=False)
    try:
        yield url.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture(scope="session")
def engine(database_url: str) -> Iterator[Engine]:
    """A database with the current schema, created once per test session."""
    eng = create_engine(database_url, pool_size=10)
    try:
        with eng.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except Exception as exc:  # a PostgreSQL we were told to use must be there
        pytest.fail(f"cannot reach the test database {database_url}: {exc}", pytrace=False)
    upgrade(database_url)  # the schema comes from the migrations, as in production
    yield eng
    eng.dispose()


@contextmanager
def empty_database(database_url: str, tmp_path: Path) -> Iterator[str]:
    """A brand-new database of the same kind as the test database (its URL), dropped after."""
    if not database_url.startswith("postgres"):
        yield f"sqlite:///{tmp_path / 'fresh.db'}"
        return
    with postgres_database(database_url, f"yilian_mig_{uuid4().hex[:8]}") as url:
        yield url


@pytest.fixture
def isolated_engine(database_url: str, tmp_path: Path) -> Iterator[Engine]:
    """A fresh, migrated database of the same kind with an engine of its own: no server drains
    its audit queue meanwhile, and nothing else writes the rows a test counts."""
    with empty_database(database_url, tmp_path) as url:
        upgrade(url)
        engine = create_engine(url)
        try:
            yield engine
        finally:
            engine.dispose()


def empty_store(engine: Engine) -> None:
    """Delete every stored resource (versions, pointers, index rows) and nothing else: the
    session's other tables (signing keys, OAuth clients ...) belong to apps other tests
    hold, whose cached keys would no longer match the database."""
    with engine.begin() as conn:
        for table in reversed(tables.metadata.sorted_tables):
            if table.name in ("resource", "resource_version") or table.name.startswith("idx_"):
                conn.execute(table.delete())


@pytest.fixture
def clean_db(engine: Engine) -> Engine:
    """No resources stored before the test, for tests that count them."""
    empty_store(engine)
    return engine


@pytest.fixture(scope="session")
def settings(database_url: str) -> Settings:
    """Authorization off (development mode): the FHIR tests exercise the store, not OAuth.
    The security tests use ``auth_app`` below, which has it on, as in production."""
    return Settings(database_url=database_url, base_url=BASE, auth="off")


@pytest.fixture(scope="session")
def app(engine: Engine, settings: Settings) -> Iterator[FastAPI]:
    app = create_app(settings, engine=engine)
    yield app
    app.state.audit_queue.close()  # let pending drains finish while the database still exists


@pytest.fixture
async def client(app: FastAPI) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE,
                                 headers={"Accept": "application/fhir+json"}) as http:
        yield http


# -- authorization on (tests/test_security_*.py) ---------------------------------------------

@pytest.fixture(scope="session")
def auth_settings(database_url: str) -> Settings:
    return Settings(database_url=database_url, base_url=BASE, auth="on")


@pytest.fixture(scope="session")
def security_settings() -> SecuritySettings:
    # http://testserver is not a loopback address: allow OAuth over plain http for the tests.
    # The rate limit is high here; tests/test_security_ratelimit.py builds its own app.
    return SecuritySettings(oauth_allow_http=True, rate_limit_per_minute=1_000_000, rate_limit_burst=1_000_000)


@pytest.fixture(scope="session")
def auth_app(engine: Engine, auth_settings: Settings, security_settings: SecuritySettings) -> Iterator[FastAPI]:
    app = create_app(auth_settings, engine=engine, security=security_settings)
    yield app
    app.state.audit_queue.close()


@pytest.fixture
async def auth_client(auth_app: FastAPI) -> httpx.AsyncClient:
    """A client of the app with authorization on; it sends no token by itself."""
    transport = httpx.ASGITransport(app=auth_app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE,
                                 headers={"Accept": "application/fhir+json"}) as http:
        yield http


@pytest.fixture
def token_for(auth_app: FastAPI) -> Callable[..., str]:
    """Sign an access token with the app's own keys, as the token endpoint would, for tests
    about what a token allows (the flows that obtain tokens have their own tests)::

        token_for("system/Patient.rs", organization="Organization/hospital-yq1")
        token_for("patient/*.rs", patient="p1", user="desk1")
    """
    from uuid import uuid4

    def make(scopes: str, *, organization: str = "Organization/hospital-yq1", patient: str | None = None,
             user: str | None = None, practitioner: str | None = None, client_id: str | None = None) -> str:
        token, _ = auth_app.state.security.tokens.issue_access_token(
            client_id=client_id or f"test-{uuid4().hex[:10]}", scope=scopes.split(), organization=organization,
            kind="user" if user else "backend", user=user, practitioner=practitioner, patient=patient)
        return token

    return make


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
