"""Reserved capacity with authorization on: the caller's organization comes from the OAuth
token instead of the development header (R22 does not care which), and the capacity admin
API needs the ``yilian/admin`` scope."""

from __future__ import annotations

from datetime import datetime, timedelta

import httpx

from service.capacity._fhir import CHINA
from service.fhir.store import ResourceStore
from tests.conftest import bearer
from tests.test_capacity_support import CLINIC, HOSPITAL, day_bundle, load_alliance, parameters, upward_referral

ADMIN = "http://testserver/admin/capacity"


async def test_r22_the_clinic_named_by_the_token_books_reserved_capacity(auth_app, auth_client: httpx.AsyncClient,
                                                                         token_for, engine) -> None:
    load_alliance(ResourceStore(engine))
    his = bearer(token_for("system/*.cruds", organization=HOSPITAL))
    day = (datetime.now(CHINA) + timedelta(days=3)).date()
    bundle, slots = day_bundle(f"auth-{datetime.now().timestamp():.0f}", day, 4)
    assert (await auth_client.post("", json=bundle, headers=his)).status_code == 200
    patient = await auth_client.post("/Patient", headers=bearer(token_for("system/*.cruds", organization=CLINIC)),
                                     json={"resourceType": "Patient", "managingOrganization": {"reference": CLINIC}})
    assert patient.status_code == 201, patient.text
    patient_ref = f"Patient/{patient.json()['id']}"
    referral = await upward_referral(engine, patient_ref)
    body = parameters(slot=f"Slot/{slots[0]}", patient=patient_ref, referral=referral)  # slots[0] is reserved

    public = bearer(token_for("system/*.cruds", organization="Organization/alliance-other"))
    refused = await auth_client.post("/Appointment/$book", json=body, headers=public)
    assert refused.status_code == 403 and "R22" in refused.json()["issue"][0]["diagnostics"]
    ignored_header = {**public, "X-Yilian-Organization": CLINIC}  # the header counts for nothing with a token
    refused = await auth_client.post("/Appointment/$book", json=body, headers=ignored_header)
    assert refused.status_code == 403 and "R22" in refused.json()["issue"][0]["diagnostics"]
    clinic = bearer(token_for("system/*.cruds", organization=CLINIC))
    booked = await auth_client.post("/Appointment/$book", json=body, headers=clinic)
    assert booked.status_code == 200, booked.text
    assert booked.json()["status"] == "booked"


async def test_capacity_admin_api_needs_the_admin_scope(auth_client: httpx.AsyncClient, token_for) -> None:
    assert (await auth_client.get(f"{ADMIN}/policy")).status_code == 401
    reader = bearer(token_for("system/*.rs", organization=HOSPITAL))
    refused = await auth_client.put(f"{ADMIN}/policy/{HOSPITAL}", json={"hold_ttl": "PT5M"}, headers=reader)
    assert refused.status_code == 403
    admin = bearer(token_for("yilian/admin", organization=HOSPITAL))
    assert (await auth_client.get(f"{ADMIN}/policy", headers=admin)).status_code == 200
    report = await auth_client.get(f"{ADMIN}/report", params={"organization": HOSPITAL, "date": "2026-03-03"},
                                   headers=admin)
    assert report.status_code == 200


async def test_operations_refuse_an_anonymous_caller_before_reading_the_body(auth_client: httpx.AsyncClient) -> None:
    """Issue #4: no token → 401 before anything else, on the operation routers too (a broken
    body must not get a 400 that tells an anonymous caller how the server parses it)."""
    broken = {"Content-Type": "application/fhir+json"}
    for path in ("/Appointment/$book", "/Appointment/$hold", "/Appointment/$find", "/ServiceRequest/$route",
                 f"{ADMIN}/policy/{HOSPITAL}"):
        method = "PUT" if path.startswith(ADMIN) else "POST"
        response = await auth_client.request(method, path, content=b"{not json", headers=broken)
        assert response.status_code == 401, (path, response.text)
        assert response.headers["www-authenticate"].startswith("Bearer")
