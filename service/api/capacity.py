"""Reserved capacity over HTTP: the Appointment operations (IHE ITI / Argonaut Scheduling) and
the admin paths for policy and reports. Registered before the FHIR router, so that
``Appointment/$find`` is never read as ``Appointment/{id}``.

Handlers take the parameters, call ``service.capacity``, and shape the answer; errors are
raised as ``FhirError`` and become OperationOutcomes in ``service.api.errors``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import orjson
from fastapi import APIRouter, Depends
from fastapi.responses import Response

from service.api.deps import Call, fhir_call, resource_body
from service.api.wire import fhir_response, resource_headers
from service.capacity import booking, policy
from service.capacity.report import capacity_report
from service.fhir.db import write_transaction
from service.fhir.errors import BadRequest, Forbidden, NotFound
from service.fhir.store import StoredResource, parse_version
from service.security.audit import record_configuration_change
from service.security.scopes import ADMIN_SCOPE

router = APIRouter()
ADMIN_SCOPE_TYPES = {"Organization", "HealthcareService"}


# -- FHIR operations -----------------------------------------------------------------------------

def find_post(body: dict = Depends(resource_body), call: Call = Depends(fhir_call)) -> Response:
    return _find(call, booking.Params(body, call.query_items()))


def find_get(call: Call = Depends(fhir_call)) -> Response:
    return _find(call, booking.Params(None, call.query_items()))


def hold(body: dict = Depends(resource_body), call: Call = Depends(fhir_call)) -> Response:
    return _resource(call, booking.hold(call.store, call.ctx, booking.Params(body)))


def book(body: dict = Depends(resource_body), call: Call = Depends(fhir_call)) -> Response:
    return _resource(call, booking.book(call.store, call.ctx, booking.Params(body)))


def cancel_type(body: dict = Depends(resource_body), call: Call = Depends(fhir_call)) -> Response:
    params = booking.Params(body)
    reference = params.string("appointment-id") or params.reference("appointment") or ""
    if not reference:
        raise BadRequest("$cancel needs appointment-id", expression="appointment-id")
    return _resource(call, booking.cancel(call.store, call.ctx, reference.rsplit("/", 1)[-1], params.string("reason")))


async def cancel_instance(resource_id: str, call: Call = Depends(fhir_call)) -> Response:
    from starlette.concurrency import run_in_threadpool

    body = await call.request.body()
    reason = booking.Params(_json(body)).string("reason") if body else None
    stored = await run_in_threadpool(booking.cancel, call.store, call.ctx, resource_id, reason)
    return _resource(call, stored)


# -- admin: policy and report --------------------------------------------------------------------

def admin_call(call: Call = Depends(fhir_call)) -> Call:
    """With authorization on, the admin paths need a token with the ``yilian/admin`` scope."""
    security = getattr(call.request.app.state, "security", None)
    if getattr(security, "enabled", False) and ADMIN_SCOPE not in call.ctx.scopes:
        raise Forbidden(f"the capacity admin API needs the scope {ADMIN_SCOPE}")
    return call


def policy_list(call: Call = Depends(admin_call)) -> Response:
    with call.store.engine.connect() as conn:
        overrides = policy.list_overrides(conn)
    return _json_response({"defaults": policy.default_policy().as_json(), "file": str(policy.POLICY_FILE),
                           "overrides": overrides})


def policy_read(resource_type: str, resource_id: str, call: Call = Depends(admin_call)) -> Response:
    scope = _scope(resource_type, resource_id)
    with call.store.engine.connect() as conn:
        return _json_response({"scope": scope, "override": policy.get_override(conn, scope),
                               "effective": _effective(call, conn, scope).as_json()})


def policy_write(resource_type: str, resource_id: str, body: dict = Depends(resource_body),
                 call: Call = Depends(admin_call)) -> Response:
    scope = _scope(resource_type, resource_id)
    with write_transaction(call.store.engine) as conn:
        before = policy.get_override(conn, scope)
        override, warnings = policy.set_override(conn, scope, body, actor=_actor(call), now=call.store.clock(),
                                                 if_match=parse_version(call.request.headers.get("if-match")))
        effective = _effective(call, conn, scope).as_json()
        _audit_policy_change(call, conn, scope, "C" if before is None else "U",
                             f"capacity policy of {scope} set: {orjson.dumps(body).decode()}")
    return _json_response({"scope": scope, "override": override, "effective": effective, "warnings": warnings})


def policy_delete(resource_type: str, resource_id: str, call: Call = Depends(admin_call)) -> Response:
    scope = _scope(resource_type, resource_id)
    with write_transaction(call.store.engine) as conn:
        removed = policy.delete_override(conn, scope, actor=_actor(call), now=call.store.clock())
        if removed:
            _audit_policy_change(call, conn, scope, "D", f"capacity policy of {scope} removed: defaults apply")
    return Response(status_code=204 if removed else 404)


def policy_history(resource_type: str, resource_id: str, call: Call = Depends(admin_call)) -> Response:
    scope = _scope(resource_type, resource_id)
    with call.store.engine.connect() as conn:
        return _json_response({"scope": scope, "history": policy.history(conn, scope)})


def report(organization: str, date: str, call: Call = Depends(admin_call)) -> Response:
    try:
        day = dt.date.fromisoformat(date)
    except ValueError:
        raise BadRequest(f"date={date} is not a day like 2026-03-02", expression="date") from None
    with call.store.engine.connect() as conn:
        return _json_response(capacity_report(conn, organization, day))


# -- helpers -------------------------------------------------------------------------------------

def _audit_policy_change(call: Call, conn: Any, scope: str, action: str, description: str) -> None:
    """Every policy change is an AuditEvent too, committed with the change (issue #4 point 5)."""
    client = call.request.client
    record_configuration_change(conn, call.ctx, what=scope, action=action, description=description,
                                address=client.host if client else None)


def _find(call: Call, params: booking.Params) -> Response:
    request = booking.FindRequest.from_parameters(params)
    bundle = booking.find(call.store, call.ctx, request, base_url=call.base_url)
    return fhir_response(bundle, media_type=call.media_type)


def _resource(call: Call, stored: StoredResource) -> Response:
    return fhir_response(stored.json, media_type=call.media_type, headers=resource_headers(stored, call.base_url))


def _scope(resource_type: str, resource_id: str) -> str:
    if resource_type not in ADMIN_SCOPE_TYPES:
        raise NotFound(f"policies are set per Organization (alliance, hospital) or HealthcareService (department), "
                       f"not per {resource_type}")
    return f"{resource_type}/{resource_id}"


def _effective(call: Call, conn: Any, scope: str) -> policy.Policy:
    """The policy in force at ``scope``: defaults, then its alliance and hospital, then itself."""
    from service.capacity import _orgs
    from service.capacity._fhir import ref_of
    from service.fhir.access import AccessContext

    with call.store.read_only(AccessContext.internal("capacity-admin")) as tx:
        org = scope
        service = None
        if scope.startswith("HealthcareService/"):
            service = scope
            org = ref_of((_orgs.content(tx, scope) or {}).get("providedBy"))
        chain = _orgs.org_chain(tx, org)
        scopes = [ref for ref, _ in reversed(chain)] + ([service] if service else [])
    return policy.effective_policy(conn, scopes or [scope])


def _actor(call: Call) -> str:
    ctx = call.ctx
    return ctx.user or ctx.practitioner or ctx.organization or ctx.client_id or "anonymous"


def _json(body: bytes) -> dict[str, Any]:
    import orjson

    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest("the body is not JSON") from None
    return value if isinstance(value, dict) else {}


def _json_response(value: dict[str, Any], status: int = 200) -> Response:
    import orjson

    return Response(orjson.dumps(value), status_code=status, media_type="application/json")


ROUTES: list[tuple[str, str, Callable[..., Any]]] = [
    ("POST", "/fhir/Appointment/$find", find_post),
    ("GET", "/fhir/Appointment/$find", find_get),
    ("POST", "/fhir/Appointment/$hold", hold),
    ("POST", "/fhir/Appointment/$book", book),
    ("POST", "/fhir/Appointment/$cancel", cancel_type),
    ("POST", "/fhir/Appointment/{resource_id}/$cancel", cancel_instance),
    ("GET", "/admin/capacity/policy", policy_list),
    ("GET", "/admin/capacity/policy/{resource_type}/{resource_id}", policy_read),
    ("PUT", "/admin/capacity/policy/{resource_type}/{resource_id}", policy_write),
    ("DELETE", "/admin/capacity/policy/{resource_type}/{resource_id}", policy_delete),
    ("GET", "/admin/capacity/policy/{resource_type}/{resource_id}/_history", policy_history),
    ("GET", "/admin/capacity/report", report),
]

for _method, _path, _handler in ROUTES:
    router.add_api_route(_path, _handler, methods=[_method], response_class=Response,
                         name=f"capacity {_method.lower()} {_path}",
                         tags=["reserved capacity"] if _path.startswith("/admin") else ["FHIR operations"])
