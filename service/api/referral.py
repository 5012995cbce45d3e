"""``POST [base]/ServiceRequest/$route``: where would this referral go? (a dry run, R31)

The body is the referral being prepared (a ServiceRequest, or Parameters with it as
``resource``). The answer is a Parameters resource: the direction, the catalogue verdict
with its reasons (file, row, rule), whether the green channel applies, and the candidates,
best first, each with the institution, the department or team and why. Nothing is written;
the same routing runs when the referral is sent.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from service.api.deps import Call, fhir_call, resource_body
from service.api.wire import fhir_response
from service.fhir.errors import BadRequest
from service.referral.routing import Route, route

router = APIRouter()


def route_referral(body: dict = Depends(resource_body), call: Call = Depends(fhir_call)) -> Response:
    referral = _referral_of(body)
    with call.store.read_only(call.ctx) as tx:
        tx.authorize("search", "ServiceRequest")
        decision = route(tx, call.request.app.state.referral, referral)
    return fhir_response(route_parameters(decision), media_type=call.media_type)


def _referral_of(body: dict[str, Any]) -> dict[str, Any]:
    if body.get("resourceType") == "Parameters":
        body = next((p.get("resource") for p in body.get("parameter") or [] if p.get("name") == "resource"), None) or {}
    if body.get("resourceType") != "ServiceRequest":
        raise BadRequest("$route takes the referral as a ServiceRequest, or Parameters with it as 'resource'",
                         expression="resourceType")
    return body


def route_parameters(decision: Route) -> dict[str, Any]:
    assessment = decision.assessment
    parameters: list[dict[str, Any]] = [
        {"name": "direction", "valueCode": decision.direction},
        {"name": "verdict", "valueCode": assessment.verdict},
        *[{"name": "reason", "valueString": reason} for reason in assessment.reasons],
        {"name": "greenChannel", "valueBoolean": decision.green_channel},
        {"name": "refused", "valueBoolean": decision.refused},
    ]
    if decision.sender:
        parameters.append({"name": "sender", "valueReference": {"reference": decision.sender}})
    if decision.alliance:
        parameters.append({"name": "alliance", "valueReference": {"reference": decision.alliance}})
    if assessment.entry is not None:
        entry = assessment.entry
        parameters.append({"name": "catalogue", "part": [
            {"name": "row", "valueInteger": entry.row},
            {"name": "code", "valueString": entry.code},
            {"name": "name", "valueString": entry.name},
            {"name": "levels", "valueString": ";".join(sorted(entry.levels))},
            {"name": "rule", "valueString": entry.rule},
        ]})
    for rank, candidate in enumerate(decision.candidates, start=1):
        part: list[dict[str, Any]] = [
            {"name": "rank", "valueInteger": rank},
            {"name": "organization", "valueReference": _ref(candidate.organization, candidate.name)},
        ]
        if candidate.department:
            part.append({"name": "department", "valueReference": _ref(candidate.department, candidate.department_name)})
        if candidate.care_team:
            part.append({"name": "careTeam", "valueReference": _ref(candidate.care_team, candidate.care_team_name)})
        part += [{"name": "reason", "valueString": reason} for reason in candidate.reasons]
        parameters.append({"name": "candidate", "part": part})
    return {"resourceType": "Parameters", "parameter": parameters}


def _ref(target: str, display: str | None) -> dict[str, str]:
    return {"reference": target, **({"display": display} if display else {})}


router.add_api_route("/ServiceRequest/$route", route_referral, methods=["POST"], response_class=Response,
                     name="post /ServiceRequest/$route", summary="Dry-run routing of a referral (R31)")
