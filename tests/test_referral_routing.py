"""Routing and the catalogue (R31, R34, R40): ``$route`` for each kind of catalogue row, the
criteria on the write path (422, override, green channel), the profile, and malformed
catalogue / policy files stopping the start with the file and the row named."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI

from service.fhir.access import AccessContext
from service.referral import codes
from service.referral.catalogue import CatalogueError, load_catalogue
from service.referral.policy import PolicyError, load_config, load_policy
from service.referral.profile import ProfileError
from tests.test_referral_support import (  # noqa: F401  (fixtures)
    CARDIOLOGY,
    ENDOCRINOLOGY,
    HEDI,
    HEDI_GP,
    HOSPITAL,
    ORTHOPAEDICS,
    REHABILITATION,
    SHANGZHAN,
    acting,
    clock,
    events,
    found_ids,
    http,
    issues_text,
    new_patient,
    referral,
    referral_app,
    send,
    task_of,
)

ROOT = Path(__file__).resolve().parent.parent
MAPPINGS = ROOT / "mappings"
PROFILES = ROOT / "fhir_profiles"


def params(parameters: dict[str, Any], name: str) -> list[Any]:
    return [p for p in parameters["parameter"] if p["name"] == name]


def value(part: dict[str, Any]) -> Any:
    return next(v for k, v in part.items() if k.startswith("value"))


def candidates(parameters: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for candidate in params(parameters, "candidate"):
        fields: dict[str, Any] = {"reasons": []}
        for part in candidate["part"]:
            if part["name"] == "reason":
                fields["reasons"].append(part["valueString"])
            elif "valueReference" in part:
                fields[part["name"]] = part["valueReference"]["reference"]
            else:
                fields[part["name"]] = value(part)
        out.append(fields)
    return out


async def route(http: httpx.AsyncClient, body: dict[str, Any], org: str = SHANGZHAN) -> dict[str, Any]:
    response = await http.post("/ServiceRequest/$route", json=body, headers=acting(org))
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["resourceType"] == "Parameters"
    return result


# -- $route, one case per kind of catalogue row -----------------------------------------------

async def test_r31_hospital_catalogue_row_routes_up_to_the_lead_hospital_and_its_department(
        http: httpx.AsyncClient) -> None:
    """I21.9 falls in the range row I20-I25 (secondary;tertiary): it meets the criteria."""
    patient = await new_patient(http)
    result = await route(http, referral(patient["ref"], icd10="I21.9"))
    assert value(params(result, "verdict")[0]) == "meets"
    catalogue = {p["name"]: value(p) for p in params(result, "catalogue")[0]["part"]}
    assert catalogue["code"] == "I20-I25" and catalogue["rule"] == "R31"
    best = candidates(result)[0]
    assert best["rank"] == 1 and best["organization"] == HOSPITAL and best["department"] == CARDIOLOGY
    assert any("lead hospital" in r for r in best["reasons"])
    assert params(result, "refused")[0]["valueBoolean"] is False


async def test_r31_a_sub_code_row_overrides_its_range(http: httpx.AsyncClient) -> None:
    """I25.2 has its own row (primary;tertiary): a clinic needs a criterion to refer it up."""
    patient = await new_patient(http)
    result = await route(http, referral(patient["ref"], icd10="I25.2"))
    assert value(params(result, "verdict")[0]) == "against"
    assert {p["name"]: value(p) for p in params(result, "catalogue")[0]["part"]}["code"] == "I25.2"
    result = await route(http, referral(patient["ref"], icd10="I25.2", criteria=("complication",)))
    assert value(params(result, "verdict")[0]) == "meets"


async def test_r31_township_catalogue_row_needs_an_upward_criterion(http: httpx.AsyncClient) -> None:
    """I10 is on the primary (township/community) catalogue only."""
    patient = await new_patient(http)
    result = await route(http, referral(patient["ref"], icd10="I10"))
    assert value(params(result, "verdict")[0]) == "against" and params(result, "refused")[0]["valueBoolean"]
    reasons = [value(p) for p in params(result, "reason")]
    assert any("referral-catalogue.csv row 2" in r and "uncontrolled" in r for r in reasons), reasons
    assert candidates(result)[0]["department"] == CARDIOLOGY  # still routed, for an override
    claimed = await route(http, referral(patient["ref"], icd10="I10", criteria=("uncontrolled",)))
    assert value(params(claimed, "verdict")[0]) == "meets"
    wrong = await route(http, referral(patient["ref"], icd10="I10", criteria=("stable",)))  # a downward criterion
    assert value(params(wrong, "verdict")[0]) == "against"


async def test_r31_both_levels_row_routes_to_the_catalogue_department(http: httpx.AsyncClient) -> None:
    """E11 (primary;tertiary) with a complication goes to endocrinology; M17 to orthopaedics."""
    patient = await new_patient(http)
    result = await route(http, referral(patient["ref"], icd10="E11.9", criteria=("complication",)))
    assert candidates(result)[0]["department"] == ENDOCRINOLOGY
    result = await route(http, referral(patient["ref"], icd10="M17.0", criteria=("needs-surgery",)))
    assert candidates(result)[0]["department"] == ORTHOPAEDICS


async def test_r31_row_without_department_routes_to_the_hospital_desk(http: httpx.AsyncClient) -> None:
    patient = await new_patient(http)
    result = await route(http, referral(patient["ref"], icd10="I63.9"))
    best = candidates(result)[0]
    assert best["organization"] == HOSPITAL and "department" not in best


async def test_r31_unlisted_condition_follows_the_policy(http: httpx.AsyncClient) -> None:
    patient = await new_patient(http)
    result = await route(http, referral(patient["ref"], icd10="K35.8"))
    assert value(params(result, "verdict")[0]) == "meets"
    assert any("unlisted_conditions.up = allow" in value(p) for p in params(result, "reason"))
    assert "catalogue" not in {p["name"] for p in result["parameter"]}


async def test_r40_downward_rows_need_a_downward_criterion_unless_on_the_grassroots_catalogue(
        http: httpx.AsyncClient) -> None:
    """Down: S72 (hospital-only) needs rehabilitation/recovery; I69 is on the grassroots
    catalogue; C34 needs palliative (R40)."""
    patient = await new_patient(http, HEDI)
    down = {"direction": "down", "service": "rehabilitation", "requester": "PractitionerRole/spec-yq1-orthopaedics-1"}
    assert value(params(await route(http, referral(patient["ref"], icd10="S72.0", **down), HOSPITAL),
                        "verdict")[0]) == "against"
    assert value(params(await route(http, referral(patient["ref"], icd10="S72.0", criteria=("rehabilitation",),
                                                   **down), HOSPITAL), "verdict")[0]) == "meets"
    assert value(params(await route(http, referral(patient["ref"], icd10="I69.3", **down), HOSPITAL),
                        "verdict")[0]) == "meets"
    assert value(params(await route(http, referral(patient["ref"], icd10="C34.1", criteria=("palliative",),
                                                   **down), HOSPITAL), "verdict")[0]) == "meets"
    best = candidates(await route(http, referral(patient["ref"], icd10="I69.3", **down), HOSPITAL))[0]
    assert best["organization"] == HEDI and best["careTeam"] == "CareTeam/team-yq-hedi"


async def test_r31_a_township_hospital_refers_up_too(http: httpx.AsyncClient) -> None:
    patient = await new_patient(http, HEDI)
    result = await route(http, referral(patient["ref"], icd10="I69.3", requester=HEDI_GP), HEDI)
    assert value(params(result, "verdict")[0]) == "against"  # sequelae are rehabilitated at the township
    best = candidates(result)[0]
    assert best["organization"] == HOSPITAL and best["department"] == REHABILITATION


# -- the criteria on the write path ------------------------------------------------------------

async def test_r31_referral_against_the_criteria_is_refused_with_the_row_and_rule(http: httpx.AsyncClient,
                                                                                 engine: sa.Engine) -> None:
    patient = await new_patient(http)
    response = await http.post("/ServiceRequest", json=referral(patient["ref"], icd10="J06.9"),
                               headers=acting(SHANGZHAN))
    assert response.status_code == 422
    text = issues_text(response)
    assert "ServiceRequest.reasonCode" in text and "J06" in text and "R31" in text and "override" in text
    assert await found_ids(http, "ServiceRequest", SHANGZHAN, subject=patient["ref"]) == []


async def test_r31_override_reason_lets_it_through_flagged_and_audited(http: httpx.AsyncClient, engine: sa.Engine,
                                                                      referral_app: FastAPI) -> None:
    patient = await new_patient(http)
    sent = await send(http, referral(patient["ref"], icd10="I10", override="患者强烈要求上级医院复诊"))
    assert {"system": codes.FLAG, "code": "criteria-override", "display": "超标准转诊"} in sent["meta"]["tag"]
    audit = events(engine, "referral.override", referral=f"ServiceRequest/{sent['id']}")
    assert len(audit) == 1 and audit[0]["reason"] == "患者强烈要求上级医院复诊" and audit[0]["by"] == SHANGZHAN
    trail = referral_app.state.store.search(AccessContext.internal(), "AuditEvent",
                                            [("entity", f"ServiceRequest/{sent['id']}")], base_url="")
    assert "override reason: 患者强烈要求上级医院复诊".encode() in trail
    assert await found_ids(http, "ServiceRequest", HOSPITAL, _tag=f"{codes.FLAG}|criteria-override",
                           subject=patient["ref"]) == [sent["id"]]


@pytest.mark.parametrize("priority", ["urgent", "asap", "stat"])
async def test_r34_urgent_referrals_take_the_green_channel_flagged(http: httpx.AsyncClient, priority: str) -> None:
    patient = await new_patient(http)
    sent = await send(http, referral(patient["ref"], icd10="I10", priority=priority))
    assert any(t["code"] == "green-channel" for t in sent["meta"]["tag"])
    assert not any(t["code"] == "criteria-override" for t in sent["meta"]["tag"])
    assert await found_ids(http, "ServiceRequest", HOSPITAL, _tag=f"{codes.FLAG}|green-channel", priority=priority,
                           subject=patient["ref"]) == [sent["id"]]


async def test_r30_service_must_fit_the_direction(http: httpx.AsyncClient) -> None:
    patient = await new_patient(http)
    response = await http.post("/ServiceRequest", json=referral(patient["ref"], service="home-care"),
                               headers=acting(SHANGZHAN))
    assert response.status_code == 422 and "ServiceRequest.code" in issues_text(response)


# -- the profile ------------------------------------------------------------------------------

@pytest.mark.parametrize("change, element", [
    ({"identifier": []}, "ServiceRequest.identifier"),
    ({"intent": "plan"}, "ServiceRequest.intent"),
    ({"priority": None}, "ServiceRequest.priority"),
    ({"reasonCode": [{"coding": [{"system": "http://snomed.info/sct", "code": "38341003"}]}]},
     "ServiceRequest.reasonCode[0].coding"),
    ({"code": {"coding": [{"system": codes.SERVICE, "code": "massage"}]}}, "ServiceRequest.code"),
    ({"requester": {"reference": "Practitioner/gp-yq-shangzhan-1"}}, "ServiceRequest.requester"),
    ({"category": [{"coding": [{"system": codes.DIRECTION, "code": "up"}]}]}, "ServiceRequest.category"),
    ({"extension": [{"url": codes.EXT_OVERRIDE_REASON, "valueBoolean": True}]}, "ServiceRequest.extension[0]"),
])
async def test_referral_profile_violations_are_422_naming_the_element(http: httpx.AsyncClient,
                                                                      change: dict[str, Any], element: str) -> None:
    patient = await new_patient(http)
    body = referral(patient["ref"])
    for key, new in change.items():
        if new is None or new == []:
            body.pop(key, None)
        else:
            body[key] = new
    response = await http.post("/ServiceRequest", json=body, headers=acting(SHANGZHAN))
    assert response.status_code == 422, response.text
    assert any(element in i.get("expression", []) for i in response.json()["issue"]), issues_text(response)


async def test_other_service_requests_are_not_referrals(http: httpx.AsyncClient) -> None:
    patient = await new_patient(http)
    response = await http.post("/ServiceRequest", headers=acting(SHANGZHAN), json={
        "resourceType": "ServiceRequest", "status": "active", "intent": "order",
        "subject": {"reference": patient["ref"]},
        "code": {"text": "血常规"}})
    assert response.status_code == 201, response.text
    assert await found_ids(http, "Task", SHANGZHAN, focus=f"ServiceRequest/{response.json()['id']}") == []


# -- malformed files --------------------------------------------------------------------------

def _copy(tmp_path: Path) -> tuple[Path, Path]:
    mappings, profiles = tmp_path / "mappings", tmp_path / "fhir_profiles"
    shutil.copytree(MAPPINGS, mappings)
    shutil.copytree(PROFILES, profiles)
    return mappings, profiles


def test_r31_the_shipped_catalogue_policy_and_profile_load() -> None:
    config = load_config(MAPPINGS, PROFILES)
    assert config.catalogue.lookup("I25.2").code == "I25.2" and config.catalogue.lookup("I21").code == "I20-I25"
    assert config.catalogue.lookup("Z00.0") is None
    assert config.policy.deadline_for("urgent", "requested").id == "SLA-ACCEPT-URGENT"


@pytest.mark.parametrize("row, message", [
    ("X1,坏码,primary,,,,R31,", "icd10 'X1'"),
    ("I30,心包炎,quaternary,,,,R31,", "levels 'quaternary'"),
    ("I30,心包炎,tertiary,,sunny,,R31,", "down_criteria 'sunny'"),
    ("I30,心包炎,tertiary,stable,,,R31,", "up_criteria 'stable' is a down criterion"),
    ("I30,心包炎,tertiary,,,cardio,R31,", "department_specialty 'cardio'"),
    ("I30,心包炎,tertiary,,,,,", "column rule is empty"),
    ("I30,心包炎,tertiary,,,,R31,,extra", "cells"),
    ("I10,原发性高血压,primary,,,,R31,", "repeats row 2"),
    ("I24-I26,重叠,tertiary,,,,R31,", "overlaps row 4"),
    ("I25-I21,倒序,tertiary,,,,R31,", "must run upward"),
])
def test_r31_malformed_catalogue_row_names_file_and_row(tmp_path: Path, row: str, message: str) -> None:
    mappings, profiles = _copy(tmp_path)
    catalogue = mappings / "referral-catalogue.csv"
    lines = catalogue.read_text(encoding="utf-8").splitlines()
    catalogue.write_text("\n".join([*lines, row]) + "\n", encoding="utf-8")
    with pytest.raises(CatalogueError) as raised:
        load_config(mappings, profiles)
    assert f"referral-catalogue.csv: row {len(lines) + 1}" in str(raised.value) and message in str(raised.value)


def test_r31_catalogue_without_a_column_names_the_header(tmp_path: Path) -> None:
    mappings, profiles = _copy(tmp_path)
    (mappings / "referral-catalogue.csv").write_text("icd10,name,levels\nI10,高血压,primary\n", encoding="utf-8")
    with pytest.raises(CatalogueError, match=r"referral-catalogue.csv: row 1 \(header\): missing column"):
        load_config(mappings, profiles)


@pytest.mark.parametrize("edit, message", [
    (lambda p: p["sla"]["deadlines"][0].update(within="2 hours"), "sla.deadlines[0].within"),
    (lambda p: p["sla"]["deadlines"][1].update(priority="stat"), "both time stat referrals"),
    (lambda p: p["long_prescription"].update(max_weeks=2), "long_prescription"),
    (lambda p: p["insurance"]["deductible"]["urban-employee"].update(county=5), "insurance.deductible.urban-employee"),
    (lambda p: p["green_channel"].pop("rule"), "green_channel.rule"),
])
def test_malformed_policy_names_file_and_field(tmp_path: Path, edit: Any, message: str) -> None:
    import json

    policy = json.loads((MAPPINGS / "referral-policy.json").read_text(encoding="utf-8"))
    edit(policy)
    path = tmp_path / "referral-policy.json"
    path.write_text(json.dumps(policy, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(PolicyError) as raised:
        load_policy(path)
    assert "referral-policy.json" in str(raised.value) and message in str(raised.value)


def test_a_profile_rule_the_checker_would_ignore_stops_the_start(tmp_path: Path) -> None:
    import json

    mappings, profiles = _copy(tmp_path)
    path = profiles / "StructureDefinition-yilian-referral.json"
    profile = json.loads(path.read_text(encoding="utf-8"))
    profile["differential"]["element"].append({"id": "ServiceRequest.note", "path": "ServiceRequest.note",
                                               "constraint": [{"key": "yl-1", "expression": "text.exists()"}]})
    path.write_text(json.dumps(profile, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(ProfileError, match="ServiceRequest.note uses constraint"):
        load_config(mappings, profiles)


def test_the_app_does_not_start_on_a_malformed_catalogue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from service.app import create_app
    from service.config import Settings

    mappings, _ = _copy(tmp_path)
    with (mappings / "referral-catalogue.csv").open("a", encoding="utf-8") as f:
        f.write("I30,心包炎,tertiary,,,,Rule31,\n")
    monkeypatch.setenv("YILIAN_MAPPINGS_DIR", str(mappings))
    with pytest.raises(CatalogueError, match="row 13"):
        create_app(Settings(database_url="sqlite://"), engine=sa.create_engine("sqlite://"))
    assert load_catalogue(MAPPINGS / "referral-catalogue.csv", {"uncontrolled": "up", "complication": "up",
                                                               "diagnosis-unclear": "up", "stable": "down",
                                                               "recovery": "down", "rehabilitation": "down",
                                                               "needs-surgery": "up", "palliative": "down"})


async def test_route_and_the_referral_search_parameters_are_in_the_capability_statement(
        http: httpx.AsyncClient) -> None:
    statement = (await http.get("/metadata")).json()
    by_type = {r["type"]: r for r in statement["rest"][0]["resource"]}
    assert {"name": "route", "definition": "https://yilian.example.org/fhir/OperationDefinition/ServiceRequest-route"} \
        in by_type["ServiceRequest"]["operation"]
    assert {"overdue", "sla-deadline"} <= {p["name"] for p in by_type["Task"]["searchParam"]}
    assert "direction" in {p["name"] for p in by_type["ServiceRequest"]["searchParam"]}
    assert "based-on" in {p["name"] for p in by_type["MedicationRequest"]["searchParam"]}
