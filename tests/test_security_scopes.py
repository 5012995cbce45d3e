"""Issue #4 point 3: SMART scopes (v1 and v2, restricted by search parameters) on every
interaction, batch and transaction entries included."""

from __future__ import annotations

from collections.abc import Callable
from uuid import uuid4

import httpx
import pytest
from fastapi import FastAPI

from service.fhir.access import AccessContext
from service.security.scopes import (
    ResourceScope,
    ScopeError,
    TokenRestriction,
    grantable,
    narrows,
    parse_scope,
)
from tests.conftest import bearer
from tests.test_security_support import HOSPITAL, ensure_organizations

CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
FHIR = {"Content-Type": "application/fhir+json"}


# -- the grammar -------------------------------------------------------------------------------

@pytest.mark.parametrize("text, context, rtype, permissions", [
    ("patient/Observation.rs", "patient", "Observation", "rs"),
    ("user/*.cruds", "user", "*", "cruds"),
    ("system/Patient.c", "system", "Patient", "c"),
    ("system/Patient.read", "system", "Patient", "rs"),  # v1
    ("user/Observation.write", "user", "Observation", "cud"),  # v1
    ("system/*.*", "system", "*", "cruds"),  # v1
])
def test_v1_and_v2_scopes_parse(text: str, context: str, rtype: str, permissions: str) -> None:
    scope = parse_scope(text)
    assert isinstance(scope, ResourceScope)
    assert (scope.context, scope.resource_type, scope.permissions) == (context, rtype, frozenset(permissions))


def test_restricted_scopes_parse_token_values() -> None:
    scope = parse_scope(f"patient/Observation.rs?category={CATEGORY}|laboratory,vital-signs")
    assert isinstance(scope, ResourceScope)
    assert scope.restrictions == (TokenRestriction("category", ((CATEGORY, "laboratory"), (None, "vital-signs"))),)


@pytest.mark.parametrize("text", [
    "system/Patient.sr",  # v2 letters out of order
    "system/Patient.x",
    "system/Nonsense.rs",
    "admin/Patient.rs",
    "patient/Observation.rs?value-quantity=5",  # not a token parameter
    "patient/Observation.rs?nonsense=1",
    "patient/*.rs?category=laboratory",  # a restriction needs a type
    "openid-ish",
])
def test_malformed_or_unenforceable_scopes_are_refused(text: str) -> None:
    with pytest.raises(ScopeError):
        parse_scope(text)


def test_grantable_and_narrowing() -> None:
    allowed = ["system/*.cruds", "yilian/introspect", "user/Patient.rs"]
    assert grantable("system/Patient.rs system/Observation.read", allowed, kind="backend") == [
        "system/Patient.rs", "system/Observation.read"]
    assert grantable("user/Patient.rs system/Patient.rs", allowed, kind="user") == ["user/Patient.rs"]
    assert grantable(None, allowed, kind="backend") == ["system/*.cruds", "yilian/introspect"]
    restricted = ["patient/Observation.rs?category=laboratory"]
    assert grantable("patient/Observation.rs", restricted, kind="user") == []
    assert grantable("patient/Observation.r?category=laboratory", restricted, kind="user") == [
        "patient/Observation.r?category=laboratory"]
    assert narrows("user/Patient.r", "user/Patient.rs offline_access")
    assert not narrows("user/Patient.rs user/Encounter.r", "user/Patient.rs")
    assert not narrows("offline_access", "user/Patient.rs")


# -- enforcement -------------------------------------------------------------------------------

@pytest.fixture
def patient_id(auth_app: FastAPI) -> str:
    """A resident managed by the hospital our tokens act for (so the boundary policy lets the
    hospital see them; the scopes are what these tests vary)."""
    ensure_organizations(auth_app)
    return auth_app.state.store.create(AccessContext.internal(), {
        "resourceType": "Patient", "gender": "male", "managingOrganization": {"reference": HOSPITAL},
        "identifier": [{"system": "urn:test", "value": uuid4().hex}]}).resource.id


def _observation(patient: str, category: str, marker: str) -> dict:
    return {"resourceType": "Observation", "status": "final",
            "category": [{"coding": [{"system": CATEGORY, "code": category}]}],
            "code": {"coding": [{"system": "urn:test", "code": marker}]}, "subject": {"reference": f"Patient/{patient}"}}


def _store_observation(app: FastAPI, patient: str, category: str, marker: str) -> str:
    return app.state.store.create(AccessContext.internal(), _observation(patient, category, marker)).resource.id


async def test_valid_token_without_the_scope_is_403(auth_client: httpx.AsyncClient,
                                                    token_for: Callable[..., str]) -> None:
    token = token_for("system/Patient.rs")
    assert (await auth_client.get("/Patient?_count=1", headers=bearer(token))).status_code == 200
    response = await auth_client.get("/Observation", headers=bearer(token))
    assert response.status_code == 403
    issue = response.json()["issue"][0]
    assert issue["code"] == "forbidden" and "system/Observation.s" in issue["diagnostics"]
    created = await auth_client.post("/Patient", json={"resourceType": "Patient"}, headers={**bearer(token), **FHIR})
    assert created.status_code == 403


@pytest.mark.parametrize("scope, allowed, refused", [
    ("system/Patient.read", ["read", "search"], ["create", "delete"]),  # v1 read = rs
    ("system/Patient.write", ["create", "delete"], ["read", "search"]),  # v1 write = cud
    ("system/Patient.rs", ["read", "search"], ["create", "delete"]),  # v2
    ("system/Patient.s", ["search"], ["read", "create"]),
    ("system/Patient.cd", ["create", "delete"], ["read", "search"]),
    ("system/*.*", ["read", "search", "create", "delete"], []),
])
async def test_each_interaction_needs_its_permission(auth_client: httpx.AsyncClient, token_for: Callable[..., str],
                                                     patient_id: str, scope: str, allowed: list[str],
                                                     refused: list[str]) -> None:
    headers = {**bearer(token_for(scope)), **FHIR}
    calls = {
        "read": lambda: auth_client.get(f"/Patient/{patient_id}", headers=headers),
        "search": lambda: auth_client.get("/Patient?_count=1", headers=headers),
        "create": lambda: auth_client.post("/Patient", headers=headers, json={
            "resourceType": "Patient", "managingOrganization": {"reference": HOSPITAL}}),
        "delete": lambda: auth_client.delete(f"/Patient/{uuid4().hex}", headers=headers),
    }
    for name in allowed:
        assert (await calls[name]()).status_code in (200, 201, 204), (scope, name)
    for name in refused:
        assert (await calls[name]()).status_code == 403, (scope, name)


async def test_history_needs_read_and_search(auth_client: httpx.AsyncClient, token_for: Callable[..., str],
                                             patient_id: str) -> None:
    assert (await auth_client.get(f"/Patient/{patient_id}/_history",
                                  headers=bearer(token_for("system/Patient.r")))).status_code == 403
    assert (await auth_client.get(f"/Patient/{patient_id}/_history",
                                  headers=bearer(token_for("system/Patient.rs")))).status_code == 200
    assert (await auth_client.get("/_history", headers=bearer(token_for("system/Patient.rs")))).status_code == 403


async def test_patient_scopes_need_a_patient_context(auth_client: httpx.AsyncClient,
                                                     token_for: Callable[..., str], patient_id: str) -> None:
    no_patient = token_for("patient/*.rs", user="desk-x")
    assert (await auth_client.get(f"/Patient/{patient_id}", headers=bearer(no_patient))).status_code == 403
    only_launch = token_for("launch/patient offline_access", user="desk-x", patient=patient_id)
    assert (await auth_client.get(f"/Patient/{patient_id}", headers=bearer(only_launch))).status_code == 403


async def test_patient_scopes_see_only_that_patients_compartment(auth_app: FastAPI, auth_client: httpx.AsyncClient,
                                                                 token_for: Callable[..., str],
                                                                 patient_id: str) -> None:
    other = auth_app.state.store.create(AccessContext.internal(), {
        "resourceType": "Patient", "managingOrganization": {"reference": HOSPITAL}}).resource.id
    mine = _store_observation(auth_app, patient_id, "laboratory", "mine")
    theirs = _store_observation(auth_app, other, "laboratory", "theirs")
    token = bearer(token_for("patient/*.rs", user="desk-y", patient=patient_id))
    assert (await auth_client.get(f"/Patient/{patient_id}", headers=token)).status_code == 200
    assert (await auth_client.get(f"/Patient/{other}", headers=token)).status_code == 404
    assert (await auth_client.get(f"/Observation/{mine}", headers=token)).status_code == 200
    assert (await auth_client.get(f"/Observation/{theirs}", headers=token)).status_code == 404
    found = (await auth_client.get("/Observation?code=urn:test|theirs", headers=token)).json()
    assert found["total"] == 0


async def test_restricted_scope_hides_other_observations_from_search_and_read(
        auth_app: FastAPI, auth_client: httpx.AsyncClient, token_for: Callable[..., str], patient_id: str) -> None:
    lab = _store_observation(auth_app, patient_id, "laboratory", "lab")
    vitals = _store_observation(auth_app, patient_id, "vital-signs", "vitals")
    for scope in ("patient/Observation.rs?category=laboratory",
                  f"patient/Observation.rs?category={CATEGORY}|laboratory"):
        token = bearer(token_for(scope, user="desk-z", patient=patient_id))
        bundle = (await auth_client.get(f"/Observation?subject=Patient/{patient_id}", headers=token)).json()
        assert [e["resource"]["id"] for e in bundle.get("entry", [])] == [lab] and bundle["total"] == 1, scope
        assert (await auth_client.get(f"/Observation/{lab}", headers=token)).status_code == 200
        assert (await auth_client.get(f"/Observation/{vitals}", headers=token)).status_code == 404
        assert (await auth_client.get(f"/Observation/{vitals}/_history/1", headers=token)).status_code in (403, 404)
    unrestricted = bearer(token_for("patient/Observation.rs", user="desk-z", patient=patient_id))
    bundle = (await auth_client.get(f"/Observation?subject=Patient/{patient_id}", headers=unrestricted)).json()
    assert {e["resource"]["id"] for e in bundle["entry"]} == {lab, vitals}


async def test_restricted_scope_limits_writes(auth_app: FastAPI, auth_client: httpx.AsyncClient,
                                              token_for: Callable[..., str], patient_id: str) -> None:
    token = {**bearer(token_for("user/Observation.cruds?category=laboratory", user="desk-w")), **FHIR}
    refused = await auth_client.post("/Observation", json=_observation(patient_id, "vital-signs", "w1"), headers=token)
    assert refused.status_code == 403
    created = await auth_client.post("/Observation", json=_observation(patient_id, "laboratory", "w2"), headers=token)
    assert created.status_code == 201, created.text
    changed = {**created.json(), "category": [{"coding": [{"system": CATEGORY, "code": "vital-signs"}]}]}
    moved = await auth_client.put(f"/Observation/{changed['id']}", json=changed, headers=token)
    assert moved.status_code == 403  # cannot move a resource out of the scope


# -- Bundles ----------------------------------------------------------------------------------

def _patient_entry(marker: str) -> dict:
    return {"fullUrl": f"urn:uuid:{uuid4()}", "request": {"method": "POST", "url": "Patient"},
            "resource": {"resourceType": "Patient", "managingOrganization": {"reference": HOSPITAL},
                         "identifier": [{"system": "urn:test", "value": marker}]}}


async def test_batch_entry_outside_the_scope_is_403_and_the_others_succeed(
        auth_client: httpx.AsyncClient, token_for: Callable[..., str], patient_id: str) -> None:
    marker = uuid4().hex
    batch = {"resourceType": "Bundle", "type": "batch", "entry": [
        _patient_entry(marker),
        {"request": {"method": "POST", "url": "Observation"}, "resource": _observation(patient_id, "laboratory", "b")},
        {"request": {"method": "GET", "url": f"Patient/{patient_id}"}},
        {"request": {"method": "GET", "url": "Encounter?_count=1"}},
    ]}
    response = await auth_client.post("", json=batch, headers={**bearer(token_for("system/Patient.cruds")), **FHIR})
    assert response.status_code == 200, response.text
    statuses = [e["response"]["status"] for e in response.json()["entry"]]
    assert statuses[0].startswith("201") and statuses[2].startswith("200")
    assert statuses[1].startswith("403") and statuses[3].startswith("403")
    outcome = response.json()["entry"][1]["response"]["outcome"]
    assert outcome["issue"][0]["code"] == "forbidden"


async def test_transaction_with_an_entry_outside_the_scope_writes_nothing(
        auth_app: FastAPI, auth_client: httpx.AsyncClient, token_for: Callable[..., str], patient_id: str) -> None:
    marker = uuid4().hex
    patient = _patient_entry(marker)
    observation = {"request": {"method": "POST", "url": "Observation"},
                   "resource": {**_observation(patient_id, "laboratory", "t"),
                                "subject": {"reference": patient["fullUrl"]}}}
    transaction = {"resourceType": "Bundle", "type": "transaction", "entry": [patient, observation]}
    response = await auth_client.post("", json=transaction,
                                      headers={**bearer(token_for("system/Patient.cruds")), **FHIR})
    assert response.status_code == 403
    assert "Bundle.entry[1]" in response.json()["issue"][0]["diagnostics"]
    with auth_app.state.store.read_only(AccessContext.internal()) as tx:
        assert tx.find("Patient", f"identifier=urn:test|{marker}") == []
    allowed = await auth_client.post("", json={**transaction, "entry": [_patient_entry(marker)]},
                                     headers={**bearer(token_for("system/Patient.cruds")), **FHIR})
    assert allowed.status_code == 200, allowed.text
