"""The FHIR RESTful API: one routing table, one small handler per interaction.

Handlers take the parameters, call the store, and shape the answer; errors are raised as
``FhirError`` and turned into OperationOutcomes by ``service.api.errors``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import jsonpatch
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from service.api.capability import capability_statement
from service.api.deps import Call, any_body, fhir_call, known_type, resource_body
from service.api.wire import JSON_PATCH, fhir_response, resource_headers, write_response
from service.fhir import bundles
from service.fhir.errors import BadRequest, Issue, Unprocessable, UnsupportedMediaType, operation_outcome
from service.fhir.store import parse_version
from service.fhir.validation import validate_resource

router = APIRouter()


# -- system level ---------------------------------------------------------------------------

def metadata(request: Request, call: Call = Depends(fhir_call)) -> Response:
    return fhir_response(capability_statement(request.app), media_type=call.media_type)


def history_system(call: Call = Depends(fhir_call)) -> Response:
    return _history(call, None, None)


def batch_or_transaction(body: dict = Depends(resource_body), call: Call = Depends(fhir_call)) -> Response:
    return fhir_response(bundles.process_bundle(call.store, call.ctx, body, base_url=call.base_url),
                         media_type=call.media_type)


# -- type level -----------------------------------------------------------------------------

def search_type(resource_type: str = Depends(known_type), call: Call = Depends(fhir_call)) -> Response:
    bundle = call.store.search(call.ctx, resource_type, call.query_items(), strict=call.prefer.strict,
                               base_url=call.base_url)
    return fhir_response(bundle, media_type=call.media_type)


async def search_post(request: Request, resource_type: str = Depends(known_type),
                      call: Call = Depends(fhir_call)) -> Response:
    """POST [type]/_search: form-encoded parameters keep identifiers out of URLs and logs."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip()
    if content_type != "application/x-www-form-urlencoded":
        raise UnsupportedMediaType("POST _search takes application/x-www-form-urlencoded parameters")
    form = await request.form()
    params = call.query_items() + [(k, str(v)) for k, v in form.multi_items()]
    from starlette.concurrency import run_in_threadpool

    bundle = await run_in_threadpool(call.store.search, call.ctx, resource_type, params,
                                     strict=call.prefer.strict, base_url=call.base_url)
    return fhir_response(bundle, media_type=call.media_type)


def create(resource_type: str = Depends(known_type), body: dict = Depends(resource_body),
           call: Call = Depends(fhir_call)) -> Response:
    if body.get("resourceType") != resource_type:
        raise BadRequest(f"the body is a {body.get('resourceType')!r}, but the URL names {resource_type}",
                         expression="resourceType")
    if_none_exist = call.request.headers.get("if-none-exist")
    result = call.store.create(call.ctx, body, if_none_exist=_criteria(if_none_exist))
    status = 201 if result.changed else 200
    return write_response(result.resource, status=status, prefer=call.prefer, media_type=call.media_type,
                          base_url=call.base_url,
                          message="created" if result.changed else "an existing resource matched If-None-Exist")


def conditional_update(resource_type: str = Depends(known_type), body: dict = Depends(resource_body),
                       call: Call = Depends(fhir_call)) -> Response:
    query = _criteria(call.query_string())
    if not query:
        raise BadRequest("a conditional update needs search criteria: PUT [type]?[criteria]")
    if body.get("resourceType") != resource_type:
        raise BadRequest(f"the body is a {body.get('resourceType')!r}, but the URL names {resource_type}",
                         expression="resourceType")
    result = call.store.conditional_update(call.ctx, resource_type, query, body)
    return write_response(result.resource, status=201 if result.created else 200, prefer=call.prefer,
                          media_type=call.media_type, base_url=call.base_url, message="updated")


def conditional_delete(resource_type: str = Depends(known_type), call: Call = Depends(fhir_call)) -> Response:
    query = _criteria(call.query_string())
    if not query:
        raise BadRequest("a conditional delete needs search criteria: DELETE [type]?[criteria]")
    call.store.conditional_delete(call.ctx, resource_type, query)
    return fhir_response(None, status=204)


def history_type(resource_type: str = Depends(known_type), call: Call = Depends(fhir_call)) -> Response:
    return _history(call, resource_type, None)


def validate_type(resource_type: str = Depends(known_type), body: dict = Depends(resource_body),
                  call: Call = Depends(fhir_call)) -> Response:
    return _validate(call, resource_type, body)


# -- instance level -------------------------------------------------------------------------

def read(resource_id: str, resource_type: str = Depends(known_type), call: Call = Depends(fhir_call)) -> Response:
    stored = call.store.read(call.ctx, resource_type, resource_id)
    headers = resource_headers(stored, call.base_url)
    del headers["Location"]
    if call.request.headers.get("if-none-match") == stored.etag:
        return Response(status_code=304, headers=headers)
    return fhir_response(stored.json, media_type=call.media_type, headers=headers)


def vread(resource_id: str, version_id: str, resource_type: str = Depends(known_type),
          call: Call = Depends(fhir_call)) -> Response:
    version = parse_version(version_id)
    assert version is not None
    stored = call.store.vread(call.ctx, resource_type, resource_id, version)
    headers = resource_headers(stored, call.base_url)
    del headers["Location"]
    return fhir_response(stored.json, media_type=call.media_type, headers=headers)


def update(resource_id: str, resource_type: str = Depends(known_type), body: dict = Depends(resource_body),
           call: Call = Depends(fhir_call)) -> Response:
    if_match = parse_version(call.request.headers.get("if-match"))
    result = call.store.update(call.ctx, resource_type, resource_id, body, if_match=if_match)
    return write_response(result.resource, status=201 if result.created else 200, prefer=call.prefer,
                          media_type=call.media_type, base_url=call.base_url,
                          message="created" if result.created else "updated")


def patch(resource_id: str, resource_type: str = Depends(known_type), body: Any = Depends(any_body),
          call: Call = Depends(fhir_call)) -> Response:
    content_type = call.request.headers.get("content-type", "").split(";")[0].strip()
    if content_type != JSON_PATCH or not isinstance(body, list):
        raise UnsupportedMediaType(f"PATCH takes a JSON Patch array as {JSON_PATCH}")
    if_match = parse_version(call.request.headers.get("if-match"))
    result = call.store.patch(call.ctx, resource_type, resource_id, _json_patch(body), if_match=if_match)
    return write_response(result.resource, status=200, prefer=call.prefer, media_type=call.media_type,
                          base_url=call.base_url, message="patched")


def delete(resource_id: str, resource_type: str = Depends(known_type), call: Call = Depends(fhir_call)) -> Response:
    deleted = call.store.delete(call.ctx, resource_type, resource_id)
    headers = {"ETag": deleted.etag} if deleted else None
    return fhir_response(None, status=204, headers=headers)


def history_instance(resource_id: str, resource_type: str = Depends(known_type),
                     call: Call = Depends(fhir_call)) -> Response:
    return _history(call, resource_type, resource_id)


def validate_instance(resource_id: str, resource_type: str = Depends(known_type),
                      body: dict = Depends(resource_body), call: Call = Depends(fhir_call)) -> Response:
    return _validate(call, resource_type, body, resource_id=resource_id)


# -- helpers --------------------------------------------------------------------------------

def _criteria(query: str | None) -> str | None:
    """Accept ``Patient?identifier=...`` as well as ``identifier=...`` in If-None-Exist."""
    if not query:
        return None
    return query.split("?", 1)[1] if "?" in query else query


def _json_patch(operations: list[Any]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    try:
        compiled = jsonpatch.JsonPatch(operations)
    except (jsonpatch.InvalidJsonPatch, TypeError) as exc:
        raise BadRequest(f"the JSON Patch is malformed: {exc}") from None

    def apply(resource: dict[str, Any]) -> dict[str, Any]:
        try:
            return compiled.apply(resource)
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
            raise Unprocessable(f"the JSON Patch cannot be applied: {exc}") from None

    return apply


def _history(call: Call, resource_type: str | None, resource_id: str | None) -> Response:
    params = call.request.query_params
    count = _bounded_count(params.get("_count"), call)
    since = _instant(params.get("_since"), "_since")
    before = params.get("_before_seq")
    before_seq = int(before) if before and before.isdigit() else None
    entries = call.store.history(call.ctx, resource_type, resource_id, count=count, before_seq=before_seq,
                                 since=since)
    path = "/".join(p for p in (resource_type, resource_id) if p)
    bundle = bundles.history_bundle(entries, base_url=call.base_url, path=path, count=count,
                                    since=params.get("_since"))
    return fhir_response(bundle, media_type=call.media_type)


def _bounded_count(value: str | None, call: Call) -> int:
    if value is None:
        return call.settings.default_page_size
    if not value.isdigit():
        raise BadRequest(f"_count={value} is not a whole number", expression="_count")
    return max(1, min(int(value), call.settings.max_page_size))


def _instant(value: str | None, name: str) -> datetime | None:
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(f"{name}={value} is not an instant like 2026-01-31T08:00:00+08:00",
                         expression=name) from None
    if moment.tzinfo is None:
        raise BadRequest(f"{name}={value} needs a time zone", expression=name)
    return moment


def _validate(call: Call, resource_type: str, body: dict[str, Any], resource_id: str | None = None) -> Response:
    """$validate: 200 with an OperationOutcome whatever the verdict (FHIR R4 Resource-validate)."""
    resource = body
    if body.get("resourceType") == "Parameters":
        resource = next((p.get("resource") for p in body.get("parameter", []) if p.get("name") == "resource"), None)
        if not isinstance(resource, dict):
            raise BadRequest("$validate with Parameters needs a 'resource' parameter")
    issues = validate_resource(resource, expected_type=resource_type)
    if resource_id is not None and resource.get("id") not in (None, resource_id):
        issues.append(Issue("error", "invalid", f"the resource id {resource.get('id')!r} differs from {resource_id!r}",
                            ("id",)))
    if not issues:
        issues = [Issue("information", "informational", f"{resource_type} is valid")]
    return fhir_response(operation_outcome(issues), media_type=call.media_type)


# The routing table: every FHIR interaction in one place. Order matters: literal segments
# (_history, _search, $validate) come before the {resource_id} that would swallow them.
ROUTES: list[tuple[str, str, Callable[..., Any]]] = [
    ("GET", "/metadata", metadata),
    ("GET", "/_history", history_system),
    ("POST", "", batch_or_transaction),
    ("POST", "/", batch_or_transaction),
    ("GET", "/{resource_type}", search_type),
    ("POST", "/{resource_type}/_search", search_post),
    ("POST", "/{resource_type}/$validate", validate_type),
    ("GET", "/{resource_type}/_history", history_type),
    ("POST", "/{resource_type}", create),
    ("PUT", "/{resource_type}", conditional_update),
    ("DELETE", "/{resource_type}", conditional_delete),
    ("POST", "/{resource_type}/{resource_id}/$validate", validate_instance),
    ("GET", "/{resource_type}/{resource_id}/_history", history_instance),
    ("GET", "/{resource_type}/{resource_id}/_history/{version_id}", vread),
    ("GET", "/{resource_type}/{resource_id}", read),
    ("PUT", "/{resource_type}/{resource_id}", update),
    ("PATCH", "/{resource_type}/{resource_id}", patch),
    ("DELETE", "/{resource_type}/{resource_id}", delete),
]

for _method, _path, _handler in ROUTES:
    router.add_api_route(_path, _handler, methods=[_method], response_class=Response,
                         name=f"{_method.lower()} {_path or '/'}", include_in_schema=True)
