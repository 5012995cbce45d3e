"""Every 4xx/5xx body is an OperationOutcome; a 500 never shows a stack trace (issue #2 point 5)."""

from __future__ import annotations

import httpx
from fastapi import FastAPI

from service.app import create_app
from service.config import Settings


async def test_unexpected_error_is_500_outcome_without_traceback(engine, settings: Settings) -> None:
    app: FastAPI = create_app(settings, engine=engine)

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret internals: password=hunter2")

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        response = await client.get("/boom")
    assert response.status_code == 500
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    assert "hunter2" not in response.text
    assert "Traceback" not in response.text
    assert "reference" in body["issue"][0]["diagnostics"]


async def test_unknown_path_is_404_outcome(client: httpx.AsyncClient) -> None:
    response = await client.get("http://testserver/not-fhir")
    assert response.status_code == 404
    assert response.json()["resourceType"] == "OperationOutcome"


async def test_body_over_the_limit_is_413(engine, database_url: str) -> None:
    app = create_app(Settings(database_url=database_url, base_url="http://testserver/fhir", max_body_bytes=200),
                     engine=engine)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver/fhir") as client:
        big = {"resourceType": "Patient", "name": [{"text": "x" * 500}]}
        response = await client.post("/Patient", json=big, headers={"Content-Type": "application/fhir+json"})
    assert response.status_code == 413
    assert response.json()["resourceType"] == "OperationOutcome"


async def test_an_unreachable_database_is_503_with_retry_after_not_500() -> None:
    """A refused database connection (restart, max_connections, a missing database) means
    "nothing happened, try again": 503 + Retry-After, an OperationOutcome, no trace."""
    from service.fhir.db import create_engine

    missing = create_engine("postgresql://postgres@127.0.0.1:5432/yilian_no_such_database_here", pool_size=1)
    app = create_app(Settings(database_url="postgresql://unused", auth="off", base_url="http://testserver/fhir"),
                     engine=missing)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as http:
        for method, path, body in (("GET", "/fhir/Patient/p1", None),
                                   ("POST", "/fhir/Patient", {"resourceType": "Patient"})):
            response = await http.request(method, path, json=body)
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"] == "1"
            outcome = response.json()
            assert outcome["resourceType"] == "OperationOutcome"
            assert outcome["issue"][0]["code"] == "transient" and "Traceback" not in response.text
    missing.dispose()
