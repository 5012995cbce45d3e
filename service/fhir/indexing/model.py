"""The slice of the FHIR R4 type model that expression compilation needs.

We borrow fhirpathpy's R4 model tables rather than shipping StructureDefinitions: they say, for
every element path, its declared type (``path2Type``), which elements are choice types
(``choiceTypePaths``: ``Observation.value`` → Quantity, CodeableConcept, ...), which backbone
elements reuse another's definition (``pathsDefinedElsewhere``: ``Questionnaire.item.item``) and
the type hierarchy (``type2Parent``: Age → Quantity). That is exactly enough to turn
``Observation.value as Quantity`` into the JSON key ``valueQuantity`` and to know that the values
found there are Quantities, without evaluating FHIRPath at write time.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from fhirpathpy.models import models

_R4 = models["r4"]
PATH_TYPES: dict[str, str] = _R4["path2Type"]
CHOICE_TYPES: dict[str, list[str]] = _R4["choiceTypePaths"]
DEFINED_ELSEWHERE: dict[str, str] = _R4["pathsDefinedElsewhere"]
TYPE_PARENTS: dict[str, str] = _R4["type2Parent"]

#: FHIR primitive types: lower-case names, values are JSON scalars (no further navigation).
PRIMITIVES = frozenset(
    {
        "base64Binary", "boolean", "canonical", "code", "date", "dateTime", "decimal", "id",
        "instant", "integer", "markdown", "oid", "positiveInt", "string", "time", "unsignedInt",
        "uri", "url", "uuid", "xhtml",
    }
)
_PRIMITIVE_BY_LOWER = {p.lower(): p for p in PRIMITIVES}

#: Every concrete resource type of R4 (Resource and DomainResource are abstract).
RESOURCE_TYPES: frozenset[str] = frozenset(
    t for t, parent in TYPE_PARENTS.items() if parent in ("Resource", "DomainResource") and t != "DomainResource"
)
ABSTRACT_RESOURCES = frozenset({"Resource", "DomainResource"})

# Every path that has children: backbone elements are not listed in path2Type themselves.
_PARENT_PATHS = frozenset(p.rsplit(".", 1)[0] for p in PATH_TYPES)


def normalize_type(name: str) -> str:
    """Spell a type as FHIR does: primitives lower-camel (``DateTime`` → ``dateTime``,
    ``System.String`` → ``string``), complex types unchanged."""
    if name.startswith("System."):
        name = name[len("System.") :]
    return _PRIMITIVE_BY_LOWER.get(name.lower(), name)


def json_suffix(type_name: str) -> str:
    """The suffix a choice element carries in JSON: ``dateTime`` → ``DateTime``."""
    return type_name[0].upper() + type_name[1:]


def is_a(type_name: str, ancestor: str) -> bool:
    """True when ``type_name`` is ``ancestor`` or derives from it (Age is a Quantity)."""
    t: str | None = type_name
    while t is not None:
        if t == ancestor:
            return True
        t = TYPE_PARENTS.get(t)
    return False


@dataclass(frozen=True)
class Child:
    """One way of reaching a child element: the JSON key, the FHIR type found there, and the
    model path to continue navigation from (a datatype name, or a backbone element's path)."""

    key: str
    type: str
    context: str


@lru_cache(maxsize=None)
def children(context: str, name: str) -> tuple[Child, ...]:
    """The JSON keys element ``name`` of ``context`` may appear under, with their types.

    A plain element gives one Child; a choice element gives one per allowed type
    (``effective`` → ``effectiveDateTime``, ``effectivePeriod``, ...). An unknown element gives
    none, which makes the caller fall back to FHIRPath evaluation.
    """
    ctx: str | None = context
    while ctx is not None:
        found = _children_exact(ctx, name)
        if found:
            return found
        ctx = TYPE_PARENTS.get(ctx)  # inherited element: Age.value is Quantity.value
    return ()


def _children_exact(context: str, name: str) -> tuple[Child, ...]:
    path = f"{context}.{name}"
    path = DEFINED_ELSEWHERE.get(path, path)
    if path in CHOICE_TYPES:
        out = []
        for raw in CHOICE_TYPES[path]:
            t = normalize_type(raw)
            out.append(Child(name + json_suffix(t), t, _context_for(t, path)))
        return tuple(out)
    declared = PATH_TYPES.get(path)
    if declared is not None:
        t = normalize_type(declared)
        if t in ("BackboneElement", "Element") and path in _PARENT_PATHS:
            return (Child(name, "BackboneElement", path),)
        return (Child(name, t, _context_for(t, path)),)
    if path in _PARENT_PATHS:  # a backbone element: children are listed under its own path
        return (Child(name, "BackboneElement", path),)
    return ()


def _context_for(type_name: str, path: str) -> str:
    return path if type_name == "BackboneElement" else type_name
