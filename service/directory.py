"""The alliance directory: organizations and the ``partOf`` tree that makes an alliance.

An alliance is an Organization typed ``alliance``; its members point at it through ``partOf``
(a department → its hospital → the alliance); levels (``primary`` | ``secondary`` |
``tertiary``) are a second ``type`` from our ``CodeSystem/organization-type``. Capacity and
referral both ask these questions; the answers come from the stored content directly (these
are the service's own look-ups, made on the caller's behalf, so the caller's visibility does
not apply) and are read once per transaction (``StoreTransaction.reference_content``).
"""

from __future__ import annotations

from typing import Any

from service.demo.codes import BASE
from service.fhir.store import StoreTransaction

ORGANIZATION_TYPE = f"{BASE}/CodeSystem/organization-type"
#: Deepest ``partOf`` chain followed (department → hospital → alliance needs 3); cycles stop too.
MAX_DEPTH = 8


def reference_of(value: Any) -> str | None:
    """``Type/id`` of a Reference or reference string (absolute URLs and ``/_history/n``
    trimmed), or None for logical, contained or absent references."""
    reference = value.get("reference") if isinstance(value, dict) else value
    if not isinstance(reference, str) or reference.startswith("#"):
        return None
    parts = [p for p in reference.split("?")[0].split("/") if p]
    if "_history" in parts:
        parts = parts[:parts.index("_history")]
    if len(parts) >= 2 and parts[-2][:1].isupper():
        return f"{parts[-2]}/{parts[-1]}"
    return None


def content(tx: StoreTransaction, reference: str | None) -> dict[str, Any] | None:
    """The current content of ``Type/id`` (None when absent, deleted or not such a reference)."""
    if not reference or reference.count("/") != 1:
        return None
    resource_type, resource_id = reference.split("/")
    return tx.reference_content(resource_type, resource_id)


def org_chain(tx: StoreTransaction, reference: str | None) -> list[tuple[str, dict[str, Any]]]:
    """The organization and its ``partOf`` ancestors, nearest first (cycle-safe)."""
    chain: list[tuple[str, dict[str, Any]]] = []
    seen: set[str] = set()
    while reference and reference.startswith("Organization/") and reference not in seen and len(chain) < MAX_DEPTH:
        seen.add(reference)
        org = content(tx, reference)
        if org is None:
            break
        chain.append((reference, org))
        reference = reference_of(org.get("partOf"))
    return chain


def type_codes(org: dict[str, Any] | None) -> set[str]:
    """The organization's codes from our ``organization-type`` system (levels, alliance ...)."""
    found: set[str] = set()
    for concept in (org or {}).get("type") or []:
        for coding in (concept.get("coding") or []) if isinstance(concept, dict) else []:
            if isinstance(coding, dict) and coding.get("system") == ORGANIZATION_TYPE and coding.get("code"):
                found.add(coding["code"])
    return found


def alliance_in(chain: list[tuple[str, dict[str, Any]]]) -> str | None:
    """The alliance a chain from :func:`org_chain` ends in, if any."""
    return next((ref for ref, org in chain if "alliance" in type_codes(org)), None)
