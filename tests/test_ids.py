"""Server-assigned ids are UUIDv7 (service/fhir/ids.py): unguessable, and growing with time so
that each new resource is appended next to the previous one in every b-tree keyed by id."""

from __future__ import annotations

import asyncio
import os
import re
import time
from uuid import UUID

import httpx

from service.fhir.ids import new_id

FHIR = "application/fhir+json"
FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


def _millis(resource_id: str) -> int:
    return int(resource_id[:12], 16)


def test_new_ids_are_uuid7_hex_with_the_current_millisecond() -> None:
    before = time.time_ns() // 1_000_000
    ids = [new_id() for _ in range(2000)]
    after = time.time_ns() // 1_000_000
    assert len(set(ids)) == len(ids)
    for resource_id in ids[:50]:
        assert FHIR_ID.fullmatch(resource_id) and len(resource_id) == 32 and resource_id == resource_id.lower()
        parsed = UUID(hex=resource_id)
        assert parsed.version == 7 and parsed.variant == "specified in RFC 4122"
        assert before <= _millis(resource_id) <= after
    # Within one millisecond the order is random; across milliseconds it follows time.
    assert [_millis(i) for i in ids] == sorted(_millis(i) for i in ids)


async def test_created_resources_get_time_ordered_ids(client: httpx.AsyncClient) -> None:
    created = []
    for family in ("甲", "乙"):
        response = await client.post("/Patient", json={"resourceType": "Patient", "name": [{"family": family}]},
                                     headers={"Content-Type": FHIR})
        assert response.status_code == 201
        created.append(response.json()["id"])
        await asyncio.sleep(0.003)  # the next create is in a later millisecond
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:4f0c1a52-9d4e-4c43-a0a4-5a3a4a0f6d01",
         "resource": {"resourceType": "Patient", "name": [{"family": "丙"}]},
         "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "血压"},
                      "subject": {"reference": "urn:uuid:4f0c1a52-9d4e-4c43-a0a4-5a3a4a0f6d01"}},
         "request": {"method": "POST", "url": "Observation"}},
    ]}
    response = await client.post("", json=bundle, headers={"Content-Type": FHIR})
    assert response.status_code == 200, response.text
    locations = [entry["response"]["location"].split("/")[1] for entry in response.json()["entry"]]
    for resource_id in created + locations:
        assert UUID(hex=resource_id).version == 7
    assert created[0] < created[1] < min(locations)


def test_ids_stay_unique_across_threads_and_forked_processes() -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        batches = list(pool.map(lambda _: [new_id() for _ in range(5000)], range(4)))
    assert len({i for batch in batches for i in batch}) == 20000

    new_id()  # this thread now holds random bytes a forked child must not reuse
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        os.write(write, new_id().encode())
        os._exit(0)
    os.waitpid(child, 0)
    in_child = os.read(read, 64).decode()
    os.close(read)
    os.close(write)
    assert in_child[12:] != new_id()[12:]  # the random parts differ
