"""Conditional create is race-free across worker processes (issue #3 point 5): concurrent
If-None-Exist creates of one identifier, from real HTTP clients against two uvicorn workers,
create exactly one resource."""

from __future__ import annotations

import asyncio
from uuid import uuid4

import httpx

from tests.live_server import live_server

# A hospital record number system: unique test values without resident-ID check characters.
MRN = "https://his.yq-hospital.example.org/mrn"


async def test_concurrent_conditional_creates_make_one_resource(engine, database_url: str) -> None:
    identifier = f"RACE{uuid4().hex[:12]}"
    body = {"resourceType": "Patient", "identifier": [{"system": MRN, "value": identifier}],
            "name": [{"text": "并发测试"}]}
    headers = {"Content-Type": "application/fhir+json",
               "If-None-Exist": f"identifier={MRN}|{identifier}"}
    with live_server(database_url, workers=2) as base:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            responses = await asyncio.gather(*(client.post("/Patient", json=body, headers=headers)
                                               for _ in range(24)))
            found = await client.get("/Patient", params={"identifier": f"{MRN}|{identifier}",
                                                         "_total": "accurate"})
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 23 + [201], statuses
    assert len({r.json()["id"] for r in responses}) == 1
    assert found.json()["total"] == 1


async def test_concurrent_transactions_with_if_none_exist_make_one_resource(engine, database_url: str) -> None:
    identifier = f"TXRACE{uuid4().hex[:10]}"
    query = f"identifier={MRN}|{identifier}"
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Patient", "identifier": [{"system": MRN, "value": identifier}]},
         "request": {"method": "POST", "url": "Patient", "ifNoneExist": query}}]}
    with live_server(database_url, workers=2) as base:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            responses = await asyncio.gather(*(client.post("", json=bundle,
                                                           headers={"Content-Type": "application/fhir+json"})
                                               for _ in range(16)))
            found = await client.get("/Patient", params={"identifier": f"{MRN}|{identifier}",
                                                         "_total": "accurate"})
    statuses = sorted(r.json()["entry"][0]["response"]["status"][:3] for r in responses)
    assert statuses == ["200"] * 15 + ["201"], statuses
    assert found.json()["total"] == 1
