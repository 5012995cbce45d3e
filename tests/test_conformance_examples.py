"""Round trip of the official FHIR R4 examples: create, read back, compare (issue #2, Tests).

Every example of every clinical and administrative type, and a sample of the conformance
types (StructureDefinition, ValueSet, ...), is POSTed, read back and compared with the
original, ignoring ``id``, ``meta`` and ``text``. At least 98 % must pass.
"""

from __future__ import annotations

import copy

import httpx

from tests.fhir_package import examples

# Definitional resources are thousands of near-identical files; 15 of each type suffice.
DEFINITIONAL = {"StructureDefinition", "ValueSet", "CodeSystem", "SearchParameter", "ConceptMap",
                "OperationDefinition", "CapabilityStatement", "CompartmentDefinition", "NamingSystem",
                "ImplementationGuide", "StructureMap", "GraphDefinition", "MessageDefinition"}
IGNORED = ("id", "meta", "text")


def _comparable(resource: dict) -> dict:
    return {k: v for k, v in resource.items() if k not in IGNORED}


async def test_official_examples_round_trip(client: httpx.AsyncClient) -> None:
    selected = [(name, r) for name, r in examples() if r["resourceType"] not in DEFINITIONAL]
    selected += list(examples(per_type=15, skip_types=frozenset(r for r in _all_types() if r not in DEFINITIONAL)))
    failures: list[str] = []
    types: set[str] = set()
    for name, original in selected:
        types.add(original["resourceType"])
        created = await client.post(f"/{original['resourceType']}", json=copy.deepcopy(original),
                                    headers={"Content-Type": "application/fhir+json"})
        if created.status_code != 201:
            failures.append(f"{name}: create {created.status_code} {created.text[:300]}")
            continue
        read = await client.get(f"/{original['resourceType']}/{created.json()['id']}")
        if read.status_code != 200 or _comparable(read.json()) != _comparable(original):
            failures.append(f"{name}: read back differs")
    passed = len(selected) - len(failures)
    rate = passed / len(selected)
    print(f"\nofficial examples: {passed}/{len(selected)} round-trip ({rate:.1%}) over {len(types)} types")
    for failure in failures:
        print("  FAIL", failure)
    assert len(types) >= 135  # the package has examples of 140 of the 146 R4 types
    assert rate >= 0.98, f"only {rate:.1%} of the official examples round-trip"


def _all_types() -> set[str]:
    from service.fhir.validation import known_resource_types

    return set(known_resource_types())
