"""Resident IDs (GB 11643-1999): validated and normalised on every write, masked in every
response unless the caller may see them, never in logs."""

from __future__ import annotations

import logging
from datetime import date
from uuid import uuid4

import httpx
import pytest
from fastapi import FastAPI

from service.demo.resident_id import make_resident_id
from service.fhir.access import AccessContext
from service.security.masking import ResidentIdLogFilter, mask_body, may_see_resident_ids
from service.security.resident_id import SYSTEM, check_character, is_valid, mask, problem
from tests.conftest import bearer
from tests.test_boundaries import FHIR, World, build_world

VALID = make_resident_id("110105", date(1958, 3, 7), 1, "male")  # 110105195803070017


def with_x() -> str:
    """A valid ID whose check character is X."""
    for seq in range(1, 500):
        candidate = make_resident_id("110105", date(1958, 3, 7), seq, "male")
        if candidate.endswith("X"):
            return candidate
    raise AssertionError("no ID with check character X")


def patient(*values: str) -> dict:
    return {"resourceType": "Patient", "name": [{"family": f"王{uuid4().hex[:6]}"}],
            "identifier": [{"system": SYSTEM, "value": v} for v in values]}


@pytest.fixture(scope="module")
def world(app: FastAPI) -> World:
    return build_world(app.state.store)


# -- the check itself ----------------------------------------------------------------------------------

def test_check_character_follows_gb_11643() -> None:
    assert check_character("11010519491231002") == "X"  # the standard's own example
    assert is_valid("11010519491231002X")
    assert not is_valid("110105194912310021")
    assert problem("11010519491231002") == "has 17 characters; a resident ID has 18"
    assert "birth date" in (problem("110105194902300020") or "")
    assert mask("11010519491231002X") == "110105********002X"


# -- on write --------------------------------------------------------------------------------------------

async def test_a_valid_resident_id_is_stored_as_sent(client: httpx.AsyncClient, app: FastAPI) -> None:
    created = await client.post("/Patient", json=patient(VALID), headers=FHIR)
    assert created.status_code == 201, created.text
    stored = app.state.store.read(AccessContext.internal(), "Patient", created.json()["id"]).as_dict()
    assert stored["identifier"][0]["value"] == VALID


async def test_lowercase_x_is_normalised(client: httpx.AsyncClient, app: FastAPI) -> None:
    upper = with_x()
    created = await client.post("/Patient", json=patient(upper[:-1] + "x"), headers=FHIR)
    assert created.status_code == 201, created.text
    stored = app.state.store.read(AccessContext.internal(), "Patient", created.json()["id"]).as_dict()
    assert stored["identifier"][0]["value"] == upper
    found = await client.get("/Patient", params={"identifier": f"{SYSTEM}|{upper}"})
    assert created.json()["id"] in {e["resource"]["id"] for e in found.json()["entry"]}


@pytest.mark.parametrize(("value", "reason"), [
    (VALID[:-1] + ("8" if VALID[-1] != "8" else "9"), "wrong check character"),
    ("110105195802300010", "birth date"),  # 30 February
    (VALID[:17], "17 characters"),
    ("11010519580307001A", "17 digits followed by a digit or X"),
])
async def test_invalid_resident_ids_are_refused_naming_the_element(client: httpx.AsyncClient, value: str,
                                                                  reason: str) -> None:
    response = await client.post("/Patient", json=patient(VALID, value), headers=FHIR)
    assert response.status_code == 422
    issue = response.json()["issue"][0]
    assert issue["expression"] == ["Patient.identifier[1].value"]
    assert reason in issue["diagnostics"]
    assert value not in response.text  # not even in the error: it would end up in logs


async def test_other_people_and_every_write_path_are_checked(client: httpx.AsyncClient) -> None:
    bad = VALID[:-1] + ("8" if VALID[-1] != "8" else "9")
    practitioner = {"resourceType": "Practitioner", "identifier": [{"system": SYSTEM, "value": bad}]}
    assert (await client.post("/Practitioner", json=practitioner, headers=FHIR)).status_code == 422
    related = {"resourceType": "RelatedPerson", "patient": {"reference": "Patient/x"},
               "identifier": [{"system": SYSTEM, "value": bad}]}
    assert (await client.post("/RelatedPerson", json=related, headers=FHIR)).status_code == 422
    transaction = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": patient(VALID), "request": {"method": "POST", "url": "Patient"}},
        {"resource": patient(bad), "request": {"method": "POST", "url": "Patient"}}]}
    refused = await client.post("", json=transaction, headers=FHIR)
    assert refused.status_code == 422 and "Patient.identifier[0].value" in refused.text
    other_system = {"resourceType": "Patient", "identifier": [{"system": "https://his.example.org/mrn", "value": "A1"}]}
    assert (await client.post("/Patient", json=other_system, headers=FHIR)).status_code == 201


# -- masked on the way out -------------------------------------------------------------------------------

def masked(rid: str) -> str:
    return rid[:6] + "********" + rid[-4:]


async def test_responses_mask_resident_ids_for_organizations(client: httpx.AsyncClient, world: World) -> None:
    rid, pid = world.resident_ids["p1"], world["p1"]
    hospital = world.as_org("hosp-a")
    responses = {
        "read": await client.get(f"/Patient/{pid}", headers=hospital),
        "vread": await client.get(f"/Patient/{pid}/_history/1", headers=hospital),
        "search": await client.get("/Patient", params={"identifier": f"{SYSTEM}|{rid}"}, headers=hospital),
        "include": await client.get("/ServiceRequest", params={"_id": world["sr1"],
                                                               "_include": "ServiceRequest:subject"}, headers=hospital),
        "history": await client.get(f"/Patient/{pid}/_history", headers=hospital),
        "batch": await client.post("", headers={**hospital, **FHIR}, json={
            "resourceType": "Bundle", "type": "batch",
            "entry": [{"request": {"method": "GET", "url": f"Patient/{pid}"}}]}),
    }
    for name, response in responses.items():
        assert response.status_code == 200, name
        assert rid not in response.text, name
        assert masked(rid) in response.text, name
        assert int(response.headers["content-length"]) == len(response.content), name


async def test_write_echoes_are_masked_but_the_stored_value_is_whole(client: httpx.AsyncClient, world: World,
                                                                    app: FastAPI) -> None:
    body = dict(patient(VALID), managingOrganization={"reference": f"Organization/{world['clinic-a1']}"})
    created = await client.post("/Patient", json=body, headers={**world.as_org("clinic-a1"), **FHIR})
    assert created.status_code == 201 and created.json()["identifier"][0]["value"] == masked(VALID)
    stored = app.state.store.read(AccessContext.internal(), "Patient", created.json()["id"]).as_dict()
    assert stored["identifier"][0]["value"] == VALID


async def test_who_sees_resident_ids_in_full(client: httpx.AsyncClient, auth_client: httpx.AsyncClient, token_for,
                                             world: World) -> None:
    rid, path = world.resident_ids["p1"], f"/Patient/{world['p1']}"
    assert rid in (await client.get(path)).text  # development mode, no organization: not restricted
    organization = f"Organization/{world['clinic-a1']}"
    plain = bearer(token_for("user/Patient.rs", organization=organization, user=f"gp-{world.tag}"))
    full = bearer(token_for("user/Patient.rs yilian/resident-id.read", organization=organization,
                            user=f"gp-{world.tag}"))
    backend = bearer(token_for("system/Patient.rs", organization=organization))
    assert masked(rid) in (await auth_client.get(path, headers=plain)).text
    assert rid in (await auth_client.get(path, headers=full)).text
    assert rid in (await auth_client.get(path, headers=backend)).text


def test_masking_reaches_every_identifier_in_a_body() -> None:
    import orjson

    body = orjson.dumps({"resourceType": "Bundle", "link": [{"url": f"Patient?identifier={SYSTEM}|{VALID}"}],
                         "entry": [{"resource": {"resourceType": "Observation",
                                                 "subject": {"identifier": {"system": SYSTEM, "value": VALID}},
                                                 "contained": [{"resourceType": "Patient",
                                                                "identifier": [{"system": SYSTEM, "value": VALID}]}],
                                                 "text": {"div": f"<div>{VALID}</div>"}}}]})
    out = mask_body(body)
    assert VALID.encode() not in out and out.count(masked(VALID).encode()) == 4
    assert mask_body(b'{"resourceType":"Patient"}') == b'{"resourceType":"Patient"}'
    assert not may_see_resident_ids(AccessContext(client_id="x", organization="Organization/a"))
    assert may_see_resident_ids(AccessContext(client_id="x", scopes=frozenset({"yilian/resident-id.read"})))


def test_logs_never_carry_resident_ids(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger(f"test.resident.{uuid4().hex[:6]}")
    logger.addFilter(ResidentIdLogFilter())
    with caplog.at_level(logging.INFO):
        logger.info('%s - "GET /fhir/Patient?identifier=%s HTTP/1.1" 200', "10.0.0.1",
                    f"urn%3Aoid%3A2.16.156.10011.1.1%7C{VALID}")
        logger.info("patient %s arrived", VALID)
    assert VALID not in caplog.text and masked(VALID) in caplog.text
