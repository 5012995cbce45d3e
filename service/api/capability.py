"""The CapabilityStatement: built from what the server really does, never written by hand.

Types come from the validation layer's list of R4 resource types, search parameters from the
same registry the search engine uses, so the statement cannot drift from the behaviour.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from fastapi import FastAPI

from service import __version__
from service.fhir.searchparams import params_for
from service.fhir.validation import known_resource_types

# Parameter types the engine answers; composite and special ones are not indexed.
SEARCHABLE_TYPES = {"number", "date", "string", "token", "reference", "quantity", "uri"}

TYPE_INTERACTIONS = ["read", "vread", "update", "patch", "delete", "history-instance", "history-type",
                     "create", "search-type"]
SYSTEM_INTERACTIONS = ["transaction", "batch", "history-system"]
OPERATIONS = [{"name": "validate", "definition": "http://hl7.org/fhir/OperationDefinition/Resource-validate"}]
_TYPE_OPERATIONS: dict[str, list[dict[str, str]]] = {}  # operations domain packages add to one type


def register_operation(resource_type: str, name: str, definition_url: str) -> None:
    """List a type-level operation (``Appointment/$find``) in the CapabilityStatement."""
    entry = {"name": name, "definition": definition_url}
    if entry not in _TYPE_OPERATIONS.setdefault(resource_type, []):
        _TYPE_OPERATIONS[resource_type].append(entry)
        _statement.cache_clear()


def capability_statement(app: FastAPI) -> dict[str, Any]:
    statement = _statement(app.state.settings.base_url.rstrip("/"))
    security = _security(app)
    if security is None:
        return statement
    return {**statement, "rest": [{**statement["rest"][0], "security": security}, *statement["rest"][1:]]}


SMART_OAUTH_URIS = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"


def _security(app: FastAPI) -> dict[str, Any] | None:
    """rest.security: SMART on FHIR, with the endpoints in the oauth-uris extension
    (none when YILIAN_AUTH=off: then nothing is asked of callers)."""
    runtime = getattr(app.state, "security", None)
    if runtime is None or not runtime.enabled:
        return None
    urls = runtime.urls
    return {
        "extension": [{"url": SMART_OAUTH_URIS, "extension": [
            {"url": "token", "valueUri": urls.token},
            {"url": "authorize", "valueUri": urls.authorize},
            {"url": "introspect", "valueUri": urls.introspect},
            {"url": "revoke", "valueUri": urls.revoke},
        ]}],
        "cors": False,
        "service": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                 "code": "SMART-on-FHIR", "display": "SMART-on-FHIR"}],
                     "text": "OAuth 2.0 with SMART on FHIR scopes; discovery at .well-known/smart-configuration"}],
        "description": "Every interaction but metadata needs a Bearer access token from the token endpoint.",
    }


_REST_DOCUMENTATION = (
    "Dates without a time zone are read as Asia/Shanghai (+08:00). "
    "Search totals: without _total, Bundle.total is exact up to YILIAN_EXACT_TOTAL_LIMIT matches (1,000 "
    "by default) and left out above it, with an informational issue in the Bundle; _total=accurate counts "
    "every match, _total=estimate gives the database's estimate beyond the limit, _total=none nothing. "
    "Paging follows the next/previous links (keyset cursors, pinned to the first page's snapshot)."
)


@lru_cache(maxsize=4)
def _statement(base_url: str) -> dict[str, Any]:
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-22",
        "publisher": "Yilian",
        "kind": "instance",
        "software": {"name": "Yilian FHIR gateway", "version": __version__},
        "implementation": {"description": "Yilian (医联) medical-alliance FHIR gateway", "url": base_url},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "patchFormat": ["application/json-patch+json"],
        "rest": [{
            "mode": "server",
            "documentation": _REST_DOCUMENTATION,
            "resource": [_resource(t) for t in sorted(known_resource_types())],
            "interaction": [{"code": code} for code in SYSTEM_INTERACTIONS],
            "operation": OPERATIONS,
        }],
    }


def _resource(resource_type: str) -> dict[str, Any]:
    params = [p for p in params_for(resource_type).values() if p.type in SEARCHABLE_TYPES]
    references = sorted(p.code for p in params if p.type == "reference")
    return {
        "type": resource_type,
        "profile": f"http://hl7.org/fhir/StructureDefinition/{resource_type}",
        "interaction": [{"code": code} for code in TYPE_INTERACTIONS],
        "versioning": "versioned-update",
        "readHistory": True,
        "updateCreate": True,
        "conditionalCreate": True,
        "conditionalRead": "not-supported",
        "conditionalUpdate": True,
        "conditionalDelete": "single",
        "referencePolicy": ["literal", "logical"],
        "searchInclude": [f"{resource_type}:{code}" for code in references],
        "searchRevInclude": [],
        "searchParam": [
            {"name": p.code, "definition": p.url, "type": p.type,
             **({"documentation": p.description} if p.description else {})}
            for p in sorted(params, key=lambda p: p.code)
        ],
        "operation": OPERATIONS + _TYPE_OPERATIONS.get(resource_type, []),
    }
