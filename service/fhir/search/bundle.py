"""The searchset Bundle, serialised once with orjson.

Each resource's stored JSON text is embedded as an ``orjson.Fragment``: it is written into the
output verbatim, never parsed and re-serialised. Only ``_summary`` / ``_elements`` need to look
inside a resource, and they parse just the resources they trim.
"""

from __future__ import annotations

from datetime import UTC, datetime
from functools import cache
from typing import Any

import orjson

from service.fhir.errors import operation_outcome
from service.fhir.ids import new_id
from service.fhir.search.model import SearchPage

SUBSETTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"}
_ALWAYS = frozenset({"resourceType", "id", "meta"})


def searchset_bundle(page: SearchPage, *, base_url: str) -> bytes:
    """``Bundle`` (type searchset) for ``page``; ``base_url`` is the FHIR base (``.../fhir``)."""
    base = base_url.rstrip("/")
    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    bundle: dict[str, Any] = {"resourceType": "Bundle", "id": new_id(), "meta": {"lastUpdated": now},
                              "type": "searchset"}
    if page.total is not None:
        bundle["total"] = page.total
    here = f"{base}/{page.resource_type}"
    links = [{"relation": "self", "url": f"{here}?{page.self_link}" if page.self_link else here}]
    if page.next_link is not None:
        links.append({"relation": "next", "url": f"{here}?{page.next_link}"})
    if page.previous_link is not None:
        links.append({"relation": "previous", "url": f"{here}?{page.previous_link}"})
    bundle["link"] = links
    entries: list[dict[str, Any]] = []
    for resource_type, rid, text in page.matches:
        entries.append({"fullUrl": f"{base}/{resource_type}/{rid}",
                        "resource": _subset(resource_type, text, page.summary, page.elements),
                        "search": {"mode": "match"}})
    for resource_type, rid, text in page.includes:
        entries.append({"fullUrl": f"{base}/{resource_type}/{rid}",
                        "resource": _subset(resource_type, text, page.summary, ()),
                        "search": {"mode": "include"}})
    if page.warnings:
        entries.append({"resource": operation_outcome(page.warnings), "search": {"mode": "outcome"}})
    if entries:
        bundle["entry"] = entries
    return orjson.dumps(bundle)


def _subset(resource_type: str, text: str | bytes, summary: str | None, elements: tuple[str, ...]) -> Any:
    """The resource as stored, or trimmed per ``_summary`` / ``_elements`` (and tagged SUBSETTED)."""
    if summary in (None, "false", "count") and not elements:
        return orjson.Fragment(text)
    if summary == "true" and not _fields(resource_type):
        return orjson.Fragment(text)  # no model to say what the summary is: send it whole
    resource: dict[str, Any] = orjson.loads(text)
    if summary == "data":
        resource.pop("text", None)
    elif summary in ("true", "text"):
        keep = _summary_keys(resource_type) if summary == "true" else _required_keys(resource_type) | {"text"}
        resource = {k: v for k, v in resource.items() if k in _ALWAYS or k.lstrip("_") in keep}
    elif elements:
        keep = _required_keys(resource_type)
        resource = {k: v for k, v in resource.items()
                    if k in _ALWAYS or k.lstrip("_") in keep or _requested(k.lstrip("_"), elements)}
    else:
        return orjson.Fragment(text)
    meta = dict(resource.get("meta") or {})
    meta["tag"] = [*(meta.get("tag") or []), SUBSETTED]
    resource["meta"] = meta
    return resource


def _requested(key: str, elements: tuple[str, ...]) -> bool:
    """``value`` selects ``valueQuantity`` (choice elements), ``name`` selects ``name``."""
    for name in elements:
        if key == name or (key.startswith(name) and len(key) > len(name) and key[len(name)].isupper()):
            return True
    return False


@cache
def _fields(resource_type: str) -> tuple[tuple[str, bool, bool], ...]:
    """(JSON key, is summary, is mandatory) for each top-level element, from the R4B model."""
    try:
        from fhir.resources.R4B import get_fhir_model_class

        model = get_fhir_model_class(resource_type)
    except (ImportError, ValueError, KeyError):  # unknown to the model: send resources whole
        return ()
    out = []
    for field in model.model_fields.values():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if not extra.get("element_property"):
            continue
        out.append((field.alias or "", bool(extra.get("summary_element_property")),
                    bool(extra.get("element_required")) or field.is_required()))
    return tuple(out)


@cache
def _summary_keys(resource_type: str) -> frozenset[str]:
    return frozenset(k for k, summary, required in _fields(resource_type) if summary or required)


@cache
def _required_keys(resource_type: str) -> frozenset[str]:
    return frozenset(k for k, _, required in _fields(resource_type) if required)
