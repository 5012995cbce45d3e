"""Writes Yilian makes on a caller's behalf (the Task, the follow-up plan, the bed request ...):
validated like any client's, so a bug shows up as a clear 422, never as invalid stored data."""

from __future__ import annotations

from typing import Any

from service.fhir.store import StoreTransaction, check_valid


def create_checked(tx: StoreTransaction, resource: dict[str, Any]) -> str:
    """Create ``resource``; returns ``Type/id``."""
    check_valid(resource)
    return tx.create(resource).resource.reference


def update_checked(tx: StoreTransaction, resource: dict[str, Any]) -> None:
    check_valid(resource, expected_type=resource["resourceType"])
    tx.update(resource["resourceType"], resource["id"], resource)
