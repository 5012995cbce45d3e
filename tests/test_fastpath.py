"""The fast path (service/api/fastpath.py) answers read, search and create exactly as FastAPI's
routes would, and takes no request that belongs to another route."""

from __future__ import annotations

import base64
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import orjson
import pytest
from fastapi import FastAPI
from sqlalchemy.engine import Engine

from service.api import capacity, rest
from service.api.fastpath import FastPath
from service.app import create_app
from service.config import Settings
from tests.conftest import BASE

FHIR = "application/fhir+json"


def _without_fast_path(app: FastAPI) -> FastAPI:
    app.user_middleware = [m for m in app.user_middleware if m.cls is not FastPath]
    return app


@pytest.fixture(scope="module")
def routed_app(engine: Engine, settings: Settings) -> Iterator[FastAPI]:
    """The same application with every request going through FastAPI's router."""
    app = _without_fast_path(create_app(settings, engine=engine))
    yield app
    app.state.audit_queue.close()


async def _client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE,
                                 headers={"Accept": FHIR}) as http:
        yield http


@pytest.fixture
async def routed(routed_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async for http in _client(routed_app):
        yield http


def _scope(method: str, path: str) -> dict[str, Any]:
    return {"type": "http", "method": method, "path": path, "root_path": "", "query_string": b"", "headers": []}


def test_the_fast_path_takes_read_search_create_hold_and_book_only() -> None:
    fast = FastPath(app=None)  # type: ignore[arg-type]  # matching only
    endpoints = {
        ("GET", "/fhir/Patient/p-1.a"): (rest.read, {"resource_type": "Patient", "resource_id": "p-1.a"}),
        ("GET", "/fhir/Patient"): (rest.search_type, {"resource_type": "Patient"}),
        ("POST", "/fhir/Patient"): (rest.create, {"resource_type": "Patient"}),
        ("POST", "/fhir/Appointment/$hold"): (capacity.hold, {}),
        ("POST", "/fhir/Appointment/$book"): (capacity.book, {}),
    }
    for (method, path), (endpoint, path_params) in endpoints.items():
        scope = _scope(method, path)
        assert fast._match(scope) is not None, (method, path)
        assert scope["endpoint"] is endpoint
        assert scope["path_params"] == path_params
    for method, path in [("GET", "/fhir/Patient/_history"), ("GET", "/fhir/Patient/p1/_history"),
                         ("GET", "/fhir/Appointment/$find"), ("POST", "/fhir/Appointment/$find"),
                         ("POST", "/fhir/Appointment/$cancel"), ("POST", "/fhir/Appointment/a1/$cancel"),
                         ("GET", "/fhir/Appointment/$book"), ("POST", "/fhir/Slot/$book"),
                         ("POST", "/fhir/Patient/_search"),
                         ("PUT", "/fhir/Patient/p1"), ("DELETE", "/fhir/Patient"), ("GET", "/fhir/NotAType/x"),
                         ("GET", "/fhir/Patient/"), ("GET", "/fhir/Patient/" + "x" * 65), ("GET", "/fhir/metadata"),
                         ("POST", "/fhir"), ("GET", "/bench/floor/Patient/p1"), ("GET", "/fhirPatient")]:
        assert FastPath(app=None)._match(_scope(method, path)) is None, (method, path)  # type: ignore[arg-type]


def test_no_other_route_claims_a_shape_the_fast_path_takes(app: FastAPI) -> None:
    """Every path of the OpenAPI document, its parameters filled with plausible values: only
    the routes it takes over may be matched by the fast path (which would otherwise shadow them)."""
    fast = FastPath(app=None)  # type: ignore[arg-type]
    taken_by_design = {("get", "/fhir/{resource_type}"), ("post", "/fhir/{resource_type}"),
                       ("get", "/fhir/{resource_type}/{resource_id}"),
                       ("post", "/fhir/Appointment/$hold"), ("post", "/fhir/Appointment/$book")}
    checked = 0
    for template, operations in app.openapi()["paths"].items():
        for method in operations:
            if (method, template) in taken_by_design:
                continue
            for value in ("Patient", "p1"):
                path = re.sub(r"\{[^}]+\}", value, template)
                assert fast._match(_scope(method.upper(), path)) is None, f"{method.upper()} {template}"
                checked += 1
    assert checked > 20


async def _both(client: httpx.AsyncClient, routed: httpx.AsyncClient, method: str, url: str,
                **kwargs: Any) -> tuple[httpx.Response, httpx.Response]:
    return (await client.request(method, url, **kwargs), await routed.request(method, url, **kwargs))


def _same(fast: httpx.Response, routed: httpx.Response, *, ignore: tuple[str, ...] = ()) -> None:
    assert fast.status_code == routed.status_code, (fast.text, routed.text)
    for header in ("content-type", "etag", "last-modified", "www-authenticate", "retry-after"):
        if header not in ignore:
            assert fast.headers.get(header) == routed.headers.get(header), header
    if "body" not in ignore:
        assert fast.content == routed.content


async def test_reads_answer_alike(client: httpx.AsyncClient, routed: httpx.AsyncClient) -> None:
    created = await client.post("/Patient", json={"resourceType": "Patient", "name": [{"family": "快"}]},
                                headers={"Content-Type": FHIR})
    assert created.status_code == 201
    pid, etag = created.json()["id"], created.headers["etag"]
    gone = (await client.post("/Patient", json={"resourceType": "Patient"}, headers={"Content-Type": FHIR})).json()["id"]
    assert (await client.delete(f"/Patient/{gone}")).status_code in (200, 204)
    for url, headers in [(f"/Patient/{pid}", {}), (f"/Patient/{pid}?_format=json", {}),
                         (f"/Patient/{pid}", {"If-None-Match": etag}), (f"/Patient/{pid}?_format=xml", {}),
                         (f"/Patient/{pid}", {"Accept": "application/fhir+xml"}), ("/Patient/unknown-1", {}),
                         (f"/Patient/{gone}", {}), (f"/Observation/{pid}", {})]:
        fast, slow = await _both(client, routed, "GET", url, headers=headers)
        _same(fast, slow)
    assert fast.status_code == 404  # the last: a Patient's id is not an Observation's


def _without_snapshot(url: str) -> str:
    """A paging link with its cursor's snapshot sequence taken out: the background audit drain
    may commit between the two requests, so the second search may pin a later sequence."""
    base, _, raw = url.partition("&_cursor=")
    if not raw:
        return url
    payload = orjson.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    assert isinstance(payload.pop("s"), int)
    return base + "&_cursor=" + orjson.dumps(payload, option=orjson.OPT_SORT_KEYS).decode()


async def test_searches_answer_alike(client: httpx.AsyncClient, routed: httpx.AsyncClient) -> None:
    for url, headers in [("/Patient?family=快", {}), ("/Patient?family=快&_summary=count", {}),
                         ("/Patient?nonsense=1", {}), ("/Patient?nonsense=1", {"Prefer": "handling=strict"}),
                         ("/Patient?birthdate=notadate", {}), ("/Patient?_count=abc", {}),
                         ("/Patient?_format=xml", {})]:
        fast, slow = await _both(client, routed, "GET", url, headers=headers)
        _same(fast, slow, ignore=("body",))
        if fast.status_code == 200:
            a, b = fast.json(), slow.json()
            for bundle in (a, b):  # each answer has its own id and timestamp
                bundle.pop("id", None)
                bundle.pop("meta", None)
                for link in bundle.get("link", []):
                    link["url"] = _without_snapshot(link["url"])
            assert a == b, url
        else:
            assert fast.content == slow.content, url


async def test_creates_answer_alike(client: httpx.AsyncClient, routed: httpx.AsyncClient) -> None:
    good = orjson.dumps({"resourceType": "Patient", "gender": "female"})
    cases: list[tuple[bytes, dict[str, str], str]] = [
        (good, {"Content-Type": FHIR}, "/Patient"),
        (good, {"Content-Type": FHIR, "Prefer": "return=minimal"}, "/Patient"),
        (good, {"Content-Type": FHIR, "Prefer": "return=OperationOutcome"}, "/Patient"),
        (good, {"Content-Type": "text/plain"}, "/Patient"),
        (b"{not json", {"Content-Type": FHIR}, "/Patient"),
        (b"[]", {"Content-Type": FHIR}, "/Patient"),
        (b"", {"Content-Type": FHIR}, "/Patient"),
        (good, {"Content-Type": FHIR}, "/Observation"),
        (orjson.dumps({"resourceType": "Patient", "gender": "x"}), {"Content-Type": FHIR}, "/Patient"),
        (orjson.dumps({"resourceType": "Patient", "birthDate": "2023-02-30"}), {"Content-Type": FHIR}, "/Patient"),
        (good, {"Content-Type": FHIR, "Accept": "application/fhir+xml"}, "/Patient"),
    ]
    for body, headers, url in cases:
        fast, slow = await _both(client, routed, "POST", url, content=body, headers=headers)
        if fast.status_code == 201:
            _same(fast, slow, ignore=("etag", "last-modified", "body"))
            assert fast.headers["location"] != slow.headers["location"]  # two resources were made
            a, b = (r.json() if r.content else None for r in (fast, slow))
            for resource in (a, b) if a is not None else ():
                resource.pop("id", None)
                resource.pop("meta", None)
                for issue in resource.get("issue", []):
                    issue.pop("diagnostics", None)
            assert a == b
        else:
            _same(fast, slow)


async def test_authorization_answers_alike(engine: Engine, auth_settings: Settings,
                                           auth_client: httpx.AsyncClient) -> None:
    from service.security.oauth.config import SecuritySettings

    routed_app = _without_fast_path(create_app(auth_settings, engine=engine, security=SecuritySettings(
        oauth_allow_http=True, rate_limit_per_minute=1_000_000, rate_limit_burst=1_000_000)))
    try:
        async for routed in _client(routed_app):
            for method, url, headers in [("GET", "/Patient/p1", {}), ("GET", "/Patient", {}),
                                         ("POST", "/Patient", {"Content-Type": FHIR}),
                                         ("GET", "/Patient/p1", {"Authorization": "Bearer not-a-token"})]:
                fast, slow = await _both(auth_client, routed, method, url, headers=headers,
                                         content=b"{}" if method == "POST" else None)
                assert fast.status_code == 401
                _same(fast, slow)
    finally:
        routed_app.state.audit_queue.close()
