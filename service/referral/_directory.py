"""Who is who in an alliance: organizations, their levels, departments and members.

An alliance is an Organization typed ``alliance``; its members point at it through
``partOf`` (a department → its hospital → the alliance). Levels (``primary`` | ``secondary`` |
``tertiary``) are a second ``type`` from ``CodeSystem/organization-type``. These are the
service's own look-ups (:mod:`service.directory`, shared with capacity), made on the caller's
behalf, so the caller's visibility does not apply.
"""

from __future__ import annotations

from typing import Any

from service.directory import alliance_in, content, org_chain, type_codes
from service.fhir.store import StoreTransaction
from service.referral.codes import HL7_ORG_TYPE, LEVELS, codes_in, ref_of

__all__ = ["alliance_of", "chain", "content", "display", "grassroots", "hospitals", "institution_level",
           "institution_of", "is_department", "is_within", "level_of", "members", "organization_of_role",
           "type_codes"]

_HOSPITAL_LEVELS = ("tertiary", "secondary")


def chain(tx: StoreTransaction, reference: str | None) -> list[tuple[str, dict[str, Any]]]:
    """The organization and its ``partOf`` ancestors, nearest first (cycle-safe)."""
    return org_chain(tx, reference)


def is_department(org: dict[str, Any]) -> bool:
    return "department" in type_codes(org) or "dept" in codes_in(org.get("type"), HL7_ORG_TYPE)


def level_of(org: dict[str, Any] | None) -> str | None:
    codes = type_codes(org or {})
    return next((level for level in LEVELS if level in codes), None)


def institution_of(tx: StoreTransaction, reference: str | None) -> str | None:
    """The institution an organization belongs to: itself, or the nearest non-department ancestor."""
    for ref, org in chain(tx, reference):
        if not is_department(org):
            return ref
    return None


def institution_level(tx: StoreTransaction, reference: str | None) -> str | None:
    """The level of the organization or of the nearest ancestor that has one."""
    for _ref, org in chain(tx, reference):
        level = level_of(org)
        if level:
            return level
        if "alliance" in type_codes(org):
            break
    return None


def alliance_of(tx: StoreTransaction, reference: str | None) -> str | None:
    return alliance_in(chain(tx, reference))


def is_within(tx: StoreTransaction, reference: str | None, ancestor: str | None) -> bool:
    """``reference`` is ``ancestor`` or one of its departments / sub-organizations (partOf tree)."""
    if not reference or not ancestor:
        return False
    return any(ref == ancestor for ref, _ in chain(tx, reference)) or reference == ancestor


def organization_of_role(tx: StoreTransaction, role_reference: str | None) -> str | None:
    """The Organization a PractitionerRole works for."""
    role = content(tx, role_reference) if role_reference and role_reference.startswith("PractitionerRole/") else None
    return ref_of((role or {}).get("organization"))


def members(tx: StoreTransaction, alliance: str) -> list[tuple[str, dict[str, Any]]]:
    """Direct members of an alliance (``partOf`` the alliance), in id order."""
    ids = tx.find("Organization", f"partof={alliance}", limit=1000)
    out = []
    for org_id in ids:
        org = tx.current_content("Organization", org_id)
        if org is not None and org.get("active", True):
            out.append((f"Organization/{org_id}", org))
    return out


def hospitals(tx: StoreTransaction, alliance: str) -> list[tuple[str, dict[str, Any], str]]:
    """Member hospitals (level secondary or tertiary) as (reference, content, level)."""
    return [(ref, org, level) for ref, org in members(tx, alliance)
            if (level := level_of(org) or "") in _HOSPITAL_LEVELS]


def grassroots(tx: StoreTransaction, alliance: str) -> list[tuple[str, dict[str, Any]]]:
    return [(ref, org) for ref, org in members(tx, alliance) if level_of(org) == "primary"]


def display(org: dict[str, Any] | None) -> str | None:
    return (org or {}).get("name")
