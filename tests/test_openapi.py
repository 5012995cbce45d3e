"""openapi/openapi.json is generated from the app; it must not go stale (issue #2 point 7)."""

from __future__ import annotations

from pathlib import Path

from service.openapi import render

COMMITTED = Path(__file__).resolve().parent.parent / "openapi" / "openapi.json"


def test_committed_openapi_matches_the_app() -> None:
    assert COMMITTED.exists(), "run `make openapi` and commit openapi/openapi.json"
    assert COMMITTED.read_bytes() == render(), "openapi/openapi.json is stale: run `make openapi` and commit it"


def test_openapi_documents_the_fhir_interactions() -> None:
    import orjson

    document = orjson.loads(render())
    paths = document["paths"]
    assert "/fhir/{resource_type}/{resource_id}" in paths
    assert {"get", "put", "patch", "delete"} <= set(paths["/fhir/{resource_type}/{resource_id}"])
    assert "/fhir/metadata" in paths
