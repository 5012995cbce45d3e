"""FHIR wire details: media types, ``_format``, ``Prefer``, body parsing, response headers."""

from __future__ import annotations

from dataclasses import dataclass
from email.utils import format_datetime
from typing import Any

import orjson
from fastapi import Request
from fastapi.responses import Response

from service.fhir.errors import (
    BadRequest,
    Issue,
    NotAcceptable,
    PayloadTooLarge,
    UnsupportedMediaType,
    operation_outcome,
)
from service.fhir.store import StoredResource

FHIR_JSON = "application/fhir+json"
JSON_PATCH = "application/json-patch+json"
_JSON_TYPES = {"application/fhir+json", "application/json", "application/json+fhir", "text/json"}
_FORMAT_ALIASES = {"json": FHIR_JSON, "application/fhir+json": FHIR_JSON, "application/json": "application/json",
                   "application/json+fhir": FHIR_JSON, "text/json": "application/json"}
_XML_TYPES = ("xml", "turtle", "ttl")


def response_media_type(request: Request) -> str:
    """The media type to answer with: ``_format`` wins over Accept; JSON is all we speak."""
    fmt = request.query_params.get("_format")
    if fmt:
        media = _FORMAT_ALIASES.get(fmt.split(";")[0].strip().lower())
        if media is None:
            raise NotAcceptable(f"_format={fmt} is not supported: this server speaks FHIR JSON only")
        return media
    accept = request.headers.get("accept", "")
    if not accept:
        return FHIR_JSON
    for part in accept.split(","):
        media = part.split(";")[0].strip().lower()
        if media in ("*/*", "application/*", "application/fhir+json", "application/json+fhir"):
            return FHIR_JSON
        if media in ("application/json", "text/json"):
            return "application/json"
    if any(kind in accept for kind in _XML_TYPES):
        raise NotAcceptable("FHIR XML and RDF are not supported: ask for application/fhir+json")
    return FHIR_JSON if "html" in accept or "text/*" in accept else _refuse(accept)


def _refuse(accept: str) -> str:
    raise NotAcceptable(f"cannot answer in {accept}: this server speaks application/fhir+json")


@dataclass(frozen=True)
class Prefer:
    return_: str = "representation"  # minimal | representation | OperationOutcome
    strict: bool = False  # handling=strict

    @classmethod
    def from_request(cls, request: Request) -> "Prefer":
        values: dict[str, str] = {}
        for header in request.headers.getlist("prefer"):
            for token in header.split(";") if ";" in header else header.split(","):
                name, _, value = token.strip().partition("=")
                values[name.strip().lower()] = value.strip().strip('"')
        return cls(return_=values.get("return", "representation"), strict=values.get("handling") == "strict")


async def read_body(request: Request, *, max_bytes: int, allow_patch: bool = False) -> Any:
    """Parse a JSON request body; 415 for other media, 413 when too large, 400 when not JSON."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    accepted = _JSON_TYPES | ({JSON_PATCH} if allow_patch else set())
    if content_type not in accepted:
        expected = " or ".join(sorted(accepted))
        raise UnsupportedMediaType(f"Content-Type '{content_type or '(none)'}' is not accepted; send {expected}")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(f"the body is {declared} bytes; the limit is {max_bytes}")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise PayloadTooLarge(f"the body is larger than the limit of {max_bytes} bytes")
    if not body:
        raise BadRequest("the request has no body")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from None


async def read_resource(request: Request, *, max_bytes: int) -> dict[str, Any]:
    body = await read_body(request, max_bytes=max_bytes)
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object holding a FHIR resource")
    return body


def http_date(resource: StoredResource) -> str:
    return format_datetime(resource.last_updated, usegmt=True)


def resource_headers(resource: StoredResource, base_url: str) -> dict[str, str]:
    return {
        "ETag": resource.etag,
        "Last-Modified": http_date(resource),
        "Location": f"{base_url}/{resource.resource_type}/{resource.id}/_history/{resource.version_id}",
    }


def fhir_response(body: bytes | dict[str, Any] | None, *, status: int = 200, media_type: str = FHIR_JSON,
                  headers: dict[str, str] | None = None) -> Response:
    if isinstance(body, dict):
        body = orjson.dumps(body)
    return Response(content=body if body is not None else b"", status_code=status, headers=headers,
                    media_type=f"{media_type}; charset=utf-8" if body is not None else None)


def write_response(resource: StoredResource, *, status: int, prefer: Prefer, media_type: str, base_url: str,
                   message: str) -> Response:
    """The answer to create/update/patch, shaped by ``Prefer: return=...``."""
    headers = resource_headers(resource, base_url)
    if prefer.return_ == "minimal":
        return fhir_response(None, status=status, headers=headers)
    if prefer.return_ == "OperationOutcome":
        outcome = operation_outcome([Issue("information", "informational", message)])
        return fhir_response(outcome, status=status, media_type=media_type, headers=headers)
    return fhir_response(resource.json, status=status, media_type=media_type, headers=headers)
