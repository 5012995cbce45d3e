"""Validation of every resource the server writes (create, update, transaction, ``$validate``).

A walk over the resource's JSON, guided by tables derived from the official R4 definitions
(``definitions/*.json``, see ``definitions/derive_validation.py``), checks structure (unknown
elements, cardinality, choice exclusivity, JSON value kinds — ``"active": "yes"`` is refused,
not coerced — primitive formats and ranges, existing calendar days, base64), required code
bindings, Reference target types, ``null`` and empty arrays/objects.

A resource the walk refuses also goes through ``fhir.resources.R4B`` (pydantic), whose
messages lead for the structural problems both find (they name pydantic's view of the
element); the walk adds what pydantic does not check. A resource the walk accepts skips
pydantic, which costs several times the walk: the tests validate thousands of mutated
official examples both ways (``cross_check``) to show the walk accepts nothing pydantic
refuses. A few R4 types have no faithful R4B model (the MedicinalProduct* family, Evidence,
...; ``r4bIncompatible`` in elements.json): for those, and any resource containing one, the
walk's issues are the answer.

The tables are loaded once, lazily, and compiled per type on first use; the walk visits only
what is present in the resource. Expressions use FHIRPath with indices and ``ofType()`` for
choice elements: ``Patient.contact[0].gender``, ``Observation.value.ofType(Quantity).comparator``.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import threading
from collections.abc import Iterable, Iterator
from datetime import date
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from service.fhir.errors import Issue

DEFINITIONS_DIR = Path(__file__).resolve().parent / "definitions"

# Codes of the IssueType value set used below.
STRUCTURE, REQUIRED, VALUE, CODE_INVALID, INVALID = "structure", "required", "value", "code-invalid", "invalid"

# A literal reference's type: "Patient/1", "Patient/1/_history/2" or a URL ending so.
_REFERENCE_LITERAL = re.compile(
    r"(?:^|/)([A-Z][A-Za-z]+)/[A-Za-z0-9\-.]{1,64}(?:/_history/[A-Za-z0-9\-.]{1,64})?$")
_MAX_CODES_SHOWN = 12
_MAX_INPUT_SHOWN = 60


# -- compiled tables --------------------------------------------------------------------------------

class _Primitive:
    """A primitive type: the JSON kind of its values and its regex (from the R4 definition)."""

    __slots__ = ("name", "kind", "pattern")

    def __init__(self, name: str, kind: str, regex: str) -> None:
        self.name = name
        self.kind = kind  # string | boolean | integer | decimal
        # base64Binary's official regex backtracks badly on large payloads; a linear one instead.
        if name == "base64Binary":
            regex = r"[0-9a-zA-Z+/=\s]+"
        # ASCII: the regexes are Java's, whose \s and \S know only ASCII whitespace (a code with a
        # no-break space is valid R4; Python's Unicode \s would say otherwise).
        self.pattern = re.compile(regex, re.ASCII) if regex and kind == "string" else None


class _ValueSet:
    """An expanded required value set: its codes per code system."""

    __slots__ = ("url", "by_system", "codes", "shown")

    def __init__(self, url: str, by_system: dict[str, list[str]]) -> None:
        self.url = url
        self.by_system = {system: frozenset(codes) for system, codes in by_system.items()}
        self.codes = frozenset().union(*self.by_system.values())
        ordered = sorted(self.codes)
        more = f" | ... {len(ordered) - _MAX_CODES_SHOWN} more" if len(ordered) > _MAX_CODES_SHOWN else ""
        self.shown = " | ".join(ordered[:_MAX_CODES_SHOWN]) + more


class _Slot:
    """One JSON property of a node: an element, or one type of a choice element."""

    __slots__ = ("key", "name", "path", "type", "is_list", "node", "primitive", "value_set", "targets")

    def __init__(self, key: str, name: str, path: str, type_code: str, is_list: bool) -> None:
        self.key = key  # the JSON property name, e.g. valueQuantity
        self.name = name  # the FHIRPath step, e.g. value.ofType(Quantity)
        self.path = path  # the definition path, e.g. Observation.value[x]
        self.type = type_code
        self.is_list = is_list
        self.node: _Node | None = None  # children of a BackboneElement (datatypes: see _Schema.node_for)
        self.primitive: _Primitive | None = None
        self.value_set: _ValueSet | None = None
        self.targets: frozenset[str] | None = None


class _Node:
    """The properties an object may have at one place: a type's root or a BackboneElement."""

    __slots__ = ("type_name", "slots", "required", "choices")

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name
        self.slots: dict[str, _Slot] = {}
        self.required: list[tuple[str, tuple[str, ...]]] = []  # (element name, JSON keys that satisfy it)
        self.choices: list[tuple[str, ...]] = []  # JSON keys of one choice element: at most one present


class _Schema:
    """The derived tables, compiled into nodes on first use of each type."""

    def __init__(self) -> None:
        elements = _load("elements.json")
        bindings = _load("required_bindings.json")
        self.types: dict[str, dict[str, Any]] = elements["types"]
        self.resource_types = frozenset(elements["resourceTypes"])
        self.r4b_incompatible = frozenset(elements["r4bIncompatible"])
        self.primitives = {name: _Primitive(name, kind, regex)
                           for name, (kind, regex) in elements["primitives"].items()}
        self.binding_paths: dict[str, str] = bindings["paths"]
        self.value_sets = {url: _ValueSet(url, codes) for url, codes in bindings["valueSets"].items()}
        self.targets = {path: frozenset(types) for path, types in _load("reference_targets.json").items()}
        self._nodes: dict[str, _Node] = {}
        self._lock = threading.Lock()

    def node_for(self, type_name: str) -> _Node | None:
        """The root node of a resource type or complex datatype, compiled once."""
        node = self._nodes.get(type_name)
        if node is None and type_name in self.types:
            with self._lock:
                node = self._nodes.get(type_name)
                if node is None:
                    node = self._compile(type_name)
                    self._nodes[type_name] = node
        return node

    def _compile(self, type_name: str) -> _Node:
        info = self.types[type_name]
        is_resource = info["kind"] == "resource"
        elements = dict(info["elements"])
        base = info.get("base")
        while base in self.types:  # the elements left out as inherited (meta, text, contained, ...)
            for name, entry in self.types[base]["elements"].items():
                elements.setdefault(name, entry)
            base = self.types[base].get("base")
        by_path: dict[str, _Node] = {}
        root = self._compile_node(type_name, type_name, elements, by_path, backbone=False)
        if is_resource:
            root.slots["id"].primitive = self.primitives["id"]
        for node in by_path.values():  # contentReference: Questionnaire.item.item -> Questionnaire.item
            for slot in node.slots.values():
                if slot.type.startswith("#"):
                    slot.node = by_path[slot.type[1:]]
                    slot.type = "BackboneElement"
        return root

    def _compile_node(self, type_name: str, path: str, elements: dict[str, list[Any]],
                      by_path: dict[str, _Node], *, backbone: bool) -> _Node:
        node = _Node(type_name)
        by_path[path] = node
        generic = {"id": ["string", 0, 0], "extension": ["Extension", 0, 1]}
        if backbone:
            generic["modifierExtension"] = ["Extension", 0, 1]
        for name, entry in {**generic, **elements}.items():
            type_spec, min_, is_list = entry[0], entry[1], bool(entry[2])
            element_path = f"{path}.{name}"
            if name.endswith("[x]"):
                base = name[:-3]
                keys = tuple(base + t[:1].upper() + t[1:] for t in type_spec)
                for key, type_code in zip(keys, type_spec):
                    self._add_slot(node, _Slot(key, f"{base}.ofType({type_code})", element_path, type_code,
                                               is_list))
                node.choices.append(keys)
                if min_:
                    node.required.append((base, keys))
                continue
            slot = self._add_slot(node, _Slot(name, name, element_path, type_spec, is_list))
            if len(entry) > 3:
                slot.node = self._compile_node(type_name, element_path, entry[3], by_path,
                                               backbone=type_spec == "BackboneElement")
            if min_:
                node.required.append((name, (name,)))
        return node

    def _add_slot(self, node: _Node, slot: _Slot) -> _Slot:
        slot.primitive = self.primitives.get(slot.type)
        url = self.binding_paths.get(slot.path)
        if url is not None and slot.type in ("code", "string", "uri", "Coding", "CodeableConcept"):
            slot.value_set = self.value_sets[url]
        if slot.type == "Reference":
            slot.targets = self.targets.get(slot.path)
        node.slots[slot.key] = slot
        return slot


def _load(name: str) -> Any:
    with (DEFINITIONS_DIR / name).open(encoding="utf-8") as handle:
        return json.load(handle)


_SCHEMA: _Schema | None = None
_SCHEMA_LOCK = threading.Lock()


def _schema() -> _Schema:
    """The compiled tables; loaded on first use so that importing this module stays cheap."""
    global _SCHEMA
    if _SCHEMA is None:
        with _SCHEMA_LOCK:
            if _SCHEMA is None:
                _SCHEMA = _Schema()
    return _SCHEMA


# -- public API -----------------------------------------------------------------------------------

def known_resource_types() -> frozenset[str]:
    """The 146 concrete FHIR R4 resource types (not the abstract Resource/DomainResource)."""
    return _schema().resource_types


def check_known_type(resource_type: str) -> bool:
    """True if ``resource_type`` names a concrete FHIR R4 resource type (case-sensitive)."""
    return resource_type in _schema().resource_types


def validate_resource(resource: dict[str, Any], *, expected_type: str | None = None,
                      cross_check: bool = False) -> list[Issue]:
    """Validate one resource against FHIR R4; return one error Issue per problem, [] if valid.

    ``expected_type`` is the type the request's URL names; a body of another type is an error.

    The walk alone decides (in "full" mode it makes every structural check pydantic makes, at
    a fraction of the cost); only a resource it refuses also goes through R4B's pydantic model,
    whose messages then lead. ``cross_check`` runs pydantic on accepted resources too: the
    tests use it to show that the walk accepts nothing pydantic refuses.
    """
    schema = _schema()
    issues = _check_resource_type(resource, expected_type, schema)
    if issues:
        return issues
    resource_type = resource["resourceType"]
    walker = _Walker(schema, full=True)
    walker.walk_resource(resource, resource_type)
    if not walker.issues and not cross_check:
        return []
    model = None if resource_type in schema.r4b_incompatible else _r4b_model(resource_type)
    if model is None or walker.needs_full:
        return walker.issues
    walker = _Walker(schema, full=False)
    walker.walk_resource(resource, resource_type)
    found = _pydantic_issues(model, resource, schema)
    return found + walker.without_duplicates_of(found)


def _check_resource_type(resource: Any, expected_type: str | None, schema: _Schema) -> list[Issue]:
    where = (f"{expected_type}.resourceType",) if expected_type else ("resourceType",)
    if not isinstance(resource, dict):
        return [Issue("error", STRUCTURE, f"a resource must be a JSON object, not {_describe(resource)}", ())]
    resource_type = resource.get("resourceType")
    if resource_type is None:
        return [Issue("error", REQUIRED, "the resource has no 'resourceType'", where)]
    if not isinstance(resource_type, str) or resource_type not in schema.resource_types:
        return [Issue("error", INVALID, f"unknown resource type {_short(resource_type)}: "
                                        "not a FHIR R4 resource type", where)]
    if expected_type is not None and resource_type != expected_type:
        return [Issue("error", INVALID, f"the resource is of type {resource_type}, but {expected_type} is "
                                        "expected here", (f"{resource_type}.resourceType",))]
    return []


# -- the walk -------------------------------------------------------------------------------------

class _Walker:
    """Walks one resource's JSON against the compiled nodes, collecting issues.

    ``full`` adds the structural checks pydantic would otherwise make (unknown elements,
    cardinality, required elements, choice exclusivity, primitive formats).
    """

    def __init__(self, schema: _Schema, *, full: bool) -> None:
        self.schema = schema
        self.full = full
        self.needs_full = False  # set when a nested resource cannot go through R4B
        self.issues: list[Issue] = []
        self.structural: set[int] = set()  # indices of issues pydantic may report too

    def error(self, code: str, expression: str, message: str, *, structural: bool = False) -> None:
        if structural:
            self.structural.add(len(self.issues))
        self.issues.append(Issue("error", code, f"{expression}: {message}", (expression,)))

    def without_duplicates_of(self, reported: list[Issue]) -> list[Issue]:
        """The walk's issues minus the structural ones pydantic already reported at the same place."""
        seen = {issue.expression for issue in reported}
        return [issue for index, issue in enumerate(self.issues)
                if index not in self.structural or issue.expression not in seen]

    def walk_resource(self, resource: dict[str, Any], expression: str) -> None:
        node = self.schema.node_for(resource["resourceType"])
        assert node is not None
        self.walk_object(node, resource, expression, root=True)

    def walk_object(self, node: _Node, obj: dict[str, Any], expression: str, *, root: bool = False) -> None:
        if not obj and not root:
            self.error(STRUCTURE, expression, "empty objects are not allowed in FHIR JSON", structural=True)
            return
        slots = node.slots
        for key, value in obj.items():
            slot = slots.get(key)
            if slot is not None:
                self.walk_property(slot, value, f"{expression}.{slot.name}", obj)
            elif key[:1] == "_" and key[1:] in slots and slots[key[1:]].primitive is not None:
                self.walk_primitive_extension(slots[key[1:]], value, f"{expression}.{slots[key[1:]].name}")
            elif root and key == "resourceType":
                continue
            elif self.full:
                self.error(STRUCTURE, f"{expression}.{key}", f"unknown element '{key}' "
                           f"(not defined for {node.type_name} in FHIR R4)")
        self.check_cardinality(node, obj, expression)

    def walk_property(self, slot: _Slot, value: Any, expression: str, obj: dict[str, Any]) -> None:
        if isinstance(value, list):
            if not slot.is_list:
                if self.full:
                    self.error(STRUCTURE, expression, "must be a single value, not an array")
                return
            if not value:
                self.error(STRUCTURE, expression, "empty arrays are not allowed in FHIR JSON", structural=True)
                return
            for index, item in enumerate(value):
                if item is None and slot.primitive is not None:
                    self.check_padding(slot, obj, index, f"{expression}[{index}]")
                else:
                    self.walk_value(slot, item, f"{expression}[{index}]")
        elif slot.is_list:
            if self.full:
                self.error(STRUCTURE, expression, f"must be an array, not {_describe(value)}")
        else:
            self.walk_value(slot, value, expression)

    def check_padding(self, slot: _Slot, obj: dict[str, Any], index: int, expression: str) -> None:
        """A null in a primitive array only pads it to line up with the ``_name`` array."""
        extensions = obj.get(f"_{slot.key}")
        if not (isinstance(extensions, list) and index < len(extensions) and extensions[index] is not None):
            self.error(STRUCTURE, expression, "null is not allowed here (it may only stand for a value "
                                              f"that has an id or extensions in '_{slot.key}')", structural=True)

    def walk_value(self, slot: _Slot, value: Any, expression: str) -> None:
        if value is None:
            self.error(STRUCTURE, expression, "null is not allowed here", structural=True)
            return
        if slot.primitive is not None:
            self.check_primitive(slot, value, expression)
            return
        if not isinstance(value, dict):
            if self.full:
                self.error(STRUCTURE, expression, f"expected an object ({slot.type}), got {_describe(value)}")
            return
        if slot.type == "Resource":
            self.walk_nested_resource(value, expression)
            return
        node = slot.node or self.schema.node_for(slot.type)
        if node is not None:
            self.walk_object(node, value, expression)
        if slot.value_set is not None:
            self.check_codings(slot, value, expression)
        if slot.targets is not None:
            self.check_reference(slot, value, expression)

    def walk_primitive_extension(self, slot: _Slot, value: Any, expression: str) -> None:
        """``_given``/``_birthDate``: the id and extensions of primitive values."""
        element = self.schema.node_for("Element")
        assert element is not None
        items = value if isinstance(value, list) and slot.is_list else [value]
        for index, item in enumerate(items):
            where = f"{expression}[{index}]" if slot.is_list else expression
            if isinstance(item, dict):
                self.walk_object(element, item, where)
            elif item is not None or not slot.is_list:
                if self.full:
                    self.error(STRUCTURE, where, f"the '_{slot.key}' entry must be an object, "
                                                 f"not {_describe(item)}")

    def walk_nested_resource(self, resource: dict[str, Any], expression: str) -> None:
        """A contained resource, Bundle entry or Parameters resource: checked by its own type."""
        resource_type = resource.get("resourceType")
        if not isinstance(resource_type, str) or resource_type not in self.schema.resource_types:
            self.needs_full = True
            if self.full:
                message = ("has no resourceType" if resource_type is None
                           else f"unknown resource type {_short(resource_type)}")
                self.error(INVALID, expression, message)
            return
        if resource_type in self.schema.r4b_incompatible:
            self.needs_full = True
        self.walk_resource(resource, expression)

    def check_cardinality(self, node: _Node, obj: dict[str, Any], expression: str) -> None:
        for name, keys in node.required:
            if not any(key in obj or f"_{key}" in obj for key in keys):
                self.error(REQUIRED, f"{expression}.{name}", "required element is missing", structural=True)
        for keys in node.choices:
            present = [key for key in keys if key in obj]
            if len(present) > 1:
                self.error(STRUCTURE, expression, f"only one of {', '.join(present)} may be present",
                           structural=True)

    # -- primitives and codes

    def check_primitive(self, slot: _Slot, value: Any, expression: str) -> None:
        primitive = slot.primitive
        assert primitive is not None
        kind = primitive.kind
        if kind == "string":
            ok = isinstance(value, str)
        elif kind == "boolean":
            ok = isinstance(value, bool)
        elif kind == "integer":
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, (int, float, Decimal)) and not isinstance(value, bool)
        if not ok:
            what = kind if kind == primitive.name else f"{kind} ({primitive.name})"
            self.error(STRUCTURE, expression, f"expected a JSON {what}, got {_describe(value)}", structural=True)
            return
        if self.full:
            self.check_format(primitive, value, expression)
        if slot.value_set is not None and value not in slot.value_set.codes:
            self.error(CODE_INVALID, expression, f"{_short(value)} is not in the required value set "
                                                 f"{slot.value_set.url} ({slot.value_set.shown})")

    def check_format(self, primitive: _Primitive, value: Any, expression: str) -> None:
        if primitive.pattern is not None and not primitive.pattern.fullmatch(value):
            self.error(VALUE, expression, f"{_short(value)} is not a valid {primitive.name}")
        elif primitive.name in _CALENDAR_TYPES and not _is_calendar_date(value):
            self.error(VALUE, expression, f"{_short(value)} is not a valid {primitive.name}: no such day")
        elif primitive.name == "base64Binary" and not _is_base64(value):
            self.error(VALUE, expression, "not valid base64 (RFC 4648: groups of four characters)")
        elif primitive.kind == "decimal" and not math.isfinite(value):
            self.error(VALUE, expression, f"{value} is not a valid decimal")
        elif primitive.kind == "integer" and not _INT32_MIN <= value <= _INT32_MAX:
            self.error(VALUE, expression, f"{value} is out of the range of a FHIR {primitive.name} (32 bits)")
        elif primitive.name == "positiveInt" and value < 1 or primitive.name == "unsignedInt" and value < 0:
            self.error(VALUE, expression, f"{value} is not a valid {primitive.name}")

    def check_codings(self, slot: _Slot, value: dict[str, Any], expression: str) -> None:
        """Codings of a required binding: only those of the value set's own systems are judged."""
        value_set = slot.value_set
        assert value_set is not None
        if slot.type == "Coding":
            codings: Iterable[tuple[Any, str]] = [(value, expression)]
        else:
            raw = value.get("coding")
            if not isinstance(raw, list):
                return
            codings = ((c, f"{expression}.coding[{i}]") for i, c in enumerate(raw))
        for coding, where in codings:
            if not isinstance(coding, dict):
                continue
            system = coding.get("system")
            codes = value_set.by_system.get(system) if isinstance(system, str) else None
            code = coding.get("code")
            if codes is not None and isinstance(code, str) and code not in codes:
                self.error(CODE_INVALID, f"{where}.code", f"{_short(code)} of system {coding['system']} is not "
                           f"in the required value set {value_set.url} ({value_set.shown})")

    def check_reference(self, slot: _Slot, value: dict[str, Any], expression: str) -> None:
        """The type a Reference points to must be one the element allows."""
        targets = slot.targets
        assert targets is not None
        for found, where in _referenced_types(value, self.schema.resource_types):
            if found not in targets:
                allowed = " | ".join(sorted(targets))
                self.error(STRUCTURE, f"{expression}.{where}", f"refers to a resource of type {found}, "
                           f"but {slot.path} may refer only to {allowed}")


_CALENDAR_TYPES = frozenset({"date", "dateTime", "instant"})
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def _is_calendar_date(value: str) -> bool:
    """The regex admits 2023-02-30; a full date must also exist (partial dates always do)."""
    if len(value) < 10:
        return True
    try:
        date.fromisoformat(value[:10])
    except ValueError:
        return False
    return True


def _is_base64(value: str) -> bool:
    try:
        base64.b64decode(_WHITESPACE.sub("", value), validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


_WHITESPACE = re.compile(r"\s+")


def _referenced_types(reference: dict[str, Any], known: frozenset[str]) -> Iterator[tuple[str, str]]:
    """The resource types a Reference names, with the property that names each.

    Literal references ``Type/id`` (relative, or absolute URLs ending so) and ``Reference.type``.
    Contained (``#id``), ``urn:uuid:``/``urn:oid:`` and conditional references name no type here;
    a reference with only ``identifier``/``display`` is logical and cannot be checked.
    """
    literal_type = None
    literal = reference.get("reference")
    if isinstance(literal, str) and not literal.startswith(("#", "urn:")) and "?" not in literal:
        match = _REFERENCE_LITERAL.search(literal)
        if match and match.group(1) in known:
            literal_type = match.group(1)
            yield literal_type, "reference"
    declared = reference.get("type")
    if isinstance(declared, str):
        name = declared.rsplit("/", 1)[-1] if declared.startswith("http://hl7.org/fhir/StructureDefinition/") \
            else declared
        if name in known and name != literal_type:  # the same wrong type is reported once
            yield name, "type"


# -- pydantic (fhir.resources R4B) ----------------------------------------------------------------

@lru_cache(maxsize=None)
def _r4b_model(resource_type: str) -> Any:
    """The R4B model class for a type, or None if R4B has none (the walk then checks structure)."""
    from fhir.resources.R4B import get_fhir_model_class

    try:
        return get_fhir_model_class(resource_type)
    except (KeyError, ValueError):
        return None


def _pydantic_issues(model: Any, resource: dict[str, Any], schema: _Schema) -> list[Issue]:
    try:
        model.model_validate(resource)
    except ValidationError as exc:
        issues = []
        for error in exc.errors(include_url=False):
            issue = _issue_from_pydantic(error, resource, schema)
            if issue is not None:
                issues.append(issue)
        return issues
    except Exception as exc:  # a model bug must not become a 500: report it as invalid content
        return [Issue("error", INVALID, f"{resource['resourceType']}: the resource could not be parsed ({exc!r})",
                      (resource["resourceType"],))]
    return []


def _issue_from_pydantic(error: dict[str, Any], resource: dict[str, Any], schema: _Schema) -> Issue | None:
    expression, slot, parent_type = _locate(error["loc"], resource, schema)
    kind = error["type"]
    key = error["loc"][-1] if error["loc"] else None
    if kind == "extra_forbidden" and parent_type == "Extension" and isinstance(key, str) and key.startswith("_") \
            and slot is not None and slot.primitive is not None:
        return None  # R4B's Extension lacks _valueString & co.; valid R4, checked by the walk instead
    if "Expect any of field value from this list" in str(error.get("msg")):
        return None  # a missing required choice element: the walk reports it, naming the element
    if kind == "string_pattern_mismatch" and slot is not None and slot.primitive is not None \
            and slot.primitive.pattern is not None and isinstance(error.get("input"), str) \
            and slot.primitive.pattern.fullmatch(error["input"]):
        return None  # pydantic's regex is Unicode-aware (\s matches U+00A0); R4's, like Java's, is not
    code, message = _describe_pydantic(error, slot, parent_type, key)
    return Issue("error", code, f"{expression}: {message}", (expression,))


def _locate(loc: tuple[Any, ...], resource: dict[str, Any], schema: _Schema) -> tuple[str, _Slot | None, str]:
    """Turn a pydantic ``loc`` into a FHIRPath expression, following the resource alongside.

    Returns the expression, the slot of the last step (None if unknown) and the type owning it.
    """
    expression = resource["resourceType"]
    node = schema.node_for(expression)
    value: Any = resource
    slot: _Slot | None = None
    owner = expression
    for step in loc:
        if isinstance(step, int):
            expression += f"[{step}]"
            value = value[step] if isinstance(value, list) and 0 <= step < len(value) else None
            if slot is not None and slot.type == "Resource":
                node = _child_node(slot, value, schema)  # contained[3]: the type of that very item
            continue
        owner = node.type_name if node is not None else owner
        slot = node.slots.get(step) if node is not None else None
        if slot is None and isinstance(step, str) and step.startswith("_") and node is not None:
            slot = node.slots.get(step[1:])
        expression += f".{slot.name if slot is not None else step}"
        value = value.get(step) if isinstance(value, dict) else None
        node = _child_node(slot, value, schema)
    return expression, slot, owner


def _child_node(slot: _Slot | None, value: Any, schema: _Schema) -> _Node | None:
    if slot is None:
        return None
    if slot.type == "Resource":  # a list (contained) is resolved at the index step that follows
        resource_type = value.get("resourceType") if isinstance(value, dict) else None
        return schema.node_for(resource_type) if isinstance(resource_type, str) else None
    return slot.node or schema.node_for(slot.type)


_EXPECTED = {"string_type": "a string", "list_type": "an array", "dict_type": "an object",
             "model_type": "an object", "model_attributes_type": "an object", "bool_type": "a boolean",
             "bool_parsing": "a boolean", "int_type": "an integer", "int_parsing": "an integer",
             "int_from_float": "an integer", "float_type": "a number", "float_parsing": "a number",
             "decimal_type": "a number", "decimal_parsing": "a number"}


def _describe_pydantic(error: dict[str, Any], slot: _Slot | None, owner: str, key: Any) -> tuple[str, str]:
    """A readable sentence (and IssueType code) for one pydantic error."""
    kind, given = error["type"], error.get("input")
    message = str(error.get("msg", "")).removeprefix("Value error, ").strip()
    if kind == "extra_forbidden":
        return STRUCTURE, f"unknown element '{key}' (not defined for {owner} in FHIR R4)"
    if kind in ("missing", "model_field_validation.missing"):
        return REQUIRED, "required element is missing"
    if kind in _EXPECTED:
        return STRUCTURE, f"expected {_EXPECTED[kind]}, got {_describe(given)}"
    if kind == "string_pattern_mismatch" or (kind == "value_error" and slot is not None and slot.primitive
                                            and not isinstance(given, (dict, list))):
        what = (slot.primitive.name if slot.primitive else slot.type) if slot is not None else "value"
        return VALUE, f"{_short(given)} is not a valid {what}"
    if "Any of one field value is expected" in message:
        choices = re.findall(r"'(\w+)'", message)
        present = [c for c in choices if isinstance(given, dict) and c in given] or choices
        return STRUCTURE, f"only one of {', '.join(present)} may be present"
    return INVALID, message.rstrip(".") or kind


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string {_short(value)}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_INPUT_SHOWN else text[:_MAX_INPUT_SHOWN - 4] + "...'"
