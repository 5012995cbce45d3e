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
