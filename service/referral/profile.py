"""Checking a referral against its profile, ``fhir_profiles/StructureDefinition-yilian-referral.json``.

The profile file is the single statement of what a referral must carry; this module reads its
differential and enforces it, so the two cannot drift apart. It understands the subset a
profile of ours uses and **refuses to load** a profile using anything else (a rule it would
silently ignore is worse than no rule):

* ``min`` / ``max`` on elements and slices, per instance of the parent element;
* ``fixedCode`` / ``fixedUri`` / ``fixedString`` / ``fixedBoolean``;
* ``patternCodeableConcept`` / ``patternCoding`` / ``patternIdentifier`` (FHIR pattern semantics:
  the value contains the pattern), as slice discriminators or as plain constraints;
* slicing by ``pattern`` (any path) and, for extensions, by ``value`` of ``url``;
* ``binding`` of strength ``required`` to one of our ValueSets (``fhir_profiles/ValueSet-*``);
* ``type[].targetProfile`` of References (the literal reference's type must be listed), and
  ``type[].profile`` of extension slices (the extension's own ``value[x]`` type is checked).

Errors come back as OperationOutcome issues whose expression names the element with indices
(``ServiceRequest.category``, ``ServiceRequest.identifier[0].value``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from service.fhir.errors import Issue

_DESCRIPTIVE = frozenset({"id", "path", "short", "definition", "comment", "requirements", "mustSupport", "alias",
                          "isSummary", "label"})
_CHECKED = frozenset({"sliceName", "min", "max", "slicing", "binding", "type", "fixedCode", "fixedUri", "fixedString",
                      "fixedBoolean", "patternCodeableConcept", "patternCoding", "patternIdentifier"})
_FIXED = ("fixedCode", "fixedUri", "fixedString", "fixedBoolean")
_PATTERNS = ("patternCodeableConcept", "patternCoding", "patternIdentifier")
_CODED = ("code", "Coding", "CodeableConcept")


class ProfileError(ValueError):
    """The profile (or a ValueSet / extension it names) is malformed or uses unsupported rules."""


@dataclass
class _Element:
    id: str
    path: str
    segments: tuple[tuple[str, str | None], ...]  # (element name, slice name) from the root's child on
    min: int | None = None
    max: int | None = None  # None: unbounded or not stated
    slicing: dict[str, Any] | None = None
    fixed: Any = None
    pattern: Any = None
    binding_codes: dict[str, frozenset[str]] | None = None  # ValueSet expanded per system
    binding_url: str | None = None
    target_types: tuple[str, ...] = ()
    extension_url: str | None = None  # extension slices: the extension's url (discriminator)
    extension_value: str | None = None  # ... and the JSON key of its value (valueString)


@dataclass(frozen=True)
class Profile:
    url: str
    resource_type: str
    elements: tuple[_Element, ...]

    def check(self, resource: dict[str, Any]) -> list[Issue]:
        """Every way ``resource`` breaks the profile (an empty list when it conforms)."""
        issues: list[Issue] = []
        for element in self.elements:
            _check_element(self, element, resource, issues)
        return issues


def load_profile(path: Path) -> Profile:
    """Read and compile a profile; ValueSets and extension definitions come from its directory."""
    try:
        sd = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ProfileError(f"{path.name}: cannot read the profile: {exc}") from None
    if sd.get("resourceType") != "StructureDefinition" or not sd.get("type") or not sd.get("url"):
        raise ProfileError(f"{path.name}: not a StructureDefinition with url and type")
    root = sd["type"]
    directory = _Directory(path.parent)
    by_id: dict[str, _Element] = {}
    ordered: list[_Element] = []
    for raw in (sd.get("differential") or {}).get("element") or []:
        element = _compile(path.name, root, raw, directory)
        if element is None:
            continue
        by_id[element.id] = element
        ordered.append(element)
    for element in ordered:  # a slice needs its sliced element, declared with slicing
        if element.segments[-1][1] is not None:
            base = by_id.get(_unsliced_id(element.id))
            if base is None or base.slicing is None:
                raise ProfileError(f"{path.name}: slice {element.id} has no sliced element with slicing")
    return Profile(sd["url"], root, tuple(ordered))


def _unsliced_id(element_id: str) -> str:
    head, _, last = element_id.rpartition(".")
    last = last.split(":")[0]
    return f"{head}.{last}" if head else last


def _parent_id(element_id: str) -> str:
    return element_id.rpartition(".")[0]


class _Directory:
    """ValueSets, CodeSystems and extension definitions next to the profile, by canonical url."""

    def __init__(self, directory: Path) -> None:
        self.by_url: dict[str, dict[str, Any]] = {}
        for file in sorted(directory.glob("*.json")):
            try:
                doc = json.loads(file.read_text(encoding="utf-8"))
            except ValueError as exc:
                raise ProfileError(f"{file.name}: not JSON: {exc}") from None
            if isinstance(doc, dict) and doc.get("url"):
                self.by_url[doc["url"]] = doc

    def value_set(self, source: str, url: str) -> dict[str, frozenset[str]]:
        vs = self.by_url.get(url)
        if vs is None or vs.get("resourceType") != "ValueSet":
            raise ProfileError(f"{source}: binding to {url}, which is no ValueSet in fhir_profiles/")
        codes: dict[str, set[str]] = {}
        for include in (vs.get("compose") or {}).get("include") or []:
            system = include.get("system")
            if not system or include.get("filter") or include.get("valueSet"):
                raise ProfileError(f"{source}: ValueSet {url} may only include whole code systems or concept lists")
            listed = [c["code"] for c in include.get("concept") or []]
            if not listed:
                cs = self.by_url.get(system)
                if cs is None or cs.get("resourceType") != "CodeSystem":
                    raise ProfileError(f"{source}: ValueSet {url} includes {system}, which is no CodeSystem here")
                listed = [c["code"] for c in _flatten(cs.get("concept") or [])]
            codes.setdefault(system, set()).update(listed)
        return {system: frozenset(found) for system, found in codes.items()}

    def extension_value_key(self, source: str, url: str) -> str | None:
        sd = self.by_url.get(url)
        if sd is None or sd.get("type") != "Extension":
            raise ProfileError(f"{source}: extension {url} has no StructureDefinition in fhir_profiles/")
        for raw in (sd.get("differential") or {}).get("element") or []:
            if raw.get("path") == "Extension.value[x]" and raw.get("type"):
                types = [t["code"] for t in raw["type"]]
                if len(types) == 1:
                    return "value" + types[0][:1].upper() + types[0][1:]
        return None  # a complex extension: no single value type to check


def _flatten(concepts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for c in concepts:
        out.append(c)
        out.extend(_flatten(c.get("concept") or []))
    return out


def _compile(source: str, root: str, raw: dict[str, Any], directory: _Directory) -> _Element | None:
    element_id = raw.get("id") or raw.get("path")
    where = f"{source}: element {element_id}"
    unknown = set(raw) - _DESCRIPTIVE - _CHECKED
    if unknown:
        raise ProfileError(f"{where} uses {', '.join(sorted(unknown))}, which service/referral/profile.py "
                           "does not enforce")
    if element_id == root:
        return None
    parts = element_id.split(".")
    if parts[0] != root:
        raise ProfileError(f"{where} does not start at {root}")
    segments = tuple((p.split(":")[0], p.split(":")[1] if ":" in p else None) for p in parts[1:])
    if any("[x]" in name for name, _ in segments):
        raise ProfileError(f"{where}: choice elements are not supported")
    element = _Element(element_id, raw.get("path", ""), segments)
    if "min" in raw:
        element.min = int(raw["min"])
    if "max" in raw:
        element.max = None if raw["max"] == "*" else int(raw["max"])
    if "slicing" in raw:
        discriminators = raw["slicing"].get("discriminator") or []
        kinds = {(d.get("type"), d.get("path")) for d in discriminators}
        if not kinds or not all(k == "pattern" or (k, p) == ("value", "url") for k, p in kinds):
            raise ProfileError(f"{where}: only pattern slicing, or value slicing on url, is supported")
        element.slicing = raw["slicing"]
    fixed = [k for k in _FIXED if k in raw]
    patterns = [k for k in _PATTERNS if k in raw]
    if len(fixed) + len(patterns) > 1:
        raise ProfileError(f"{where}: more than one fixed/pattern value")
    if fixed:
        element.fixed = raw[fixed[0]]
    if patterns:
        element.pattern = raw[patterns[0]]
    if "binding" in raw:
        binding = raw["binding"]
        if binding.get("strength") != "required" or not binding.get("valueSet"):
            raise ProfileError(f"{where}: only required bindings to a ValueSet are enforced")
        element.binding_url = binding["valueSet"]
        element.binding_codes = directory.value_set(where, binding["valueSet"])
    for t in raw.get("type") or []:
        if t.get("code") == "Reference":
            element.target_types += tuple(p.rsplit("/", 1)[-1] for p in t.get("targetProfile") or [])
        elif t.get("code") == "Extension" and t.get("profile"):
            if len(t["profile"]) != 1:
                raise ProfileError(f"{where}: an extension slice names exactly one extension profile")
            element.extension_url = t["profile"][0]
            element.extension_value = directory.extension_value_key(where, t["profile"][0])
        else:
            raise ProfileError(f"{where}: type {t.get('code')} constraints are not supported")
    return element


# -- checking ---------------------------------------------------------------------------------

def _check_element(profile: Profile, element: _Element, resource: dict[str, Any], issues: list[Issue]) -> None:
    for parent_expr, parent in _instances(profile, resource, element.segments[:-1]):
        name, slice_name = element.segments[-1]
        values = [(f"{parent_expr}.{name}" + (f"[{i}]" if is_list else ""), v)
                  for i, v, is_list in _children(parent, name)]
        if slice_name is not None:
            values = [(e, v) for e, v in values if _in_slice(element, v)]
        what = f"{parent_expr}.{name}" + (f" (slice {slice_name})" if slice_name else "")
        if element.min and len(values) < element.min:
            detail = _slice_hint(element)
            issues.append(Issue("error", "required", f"{what}: at least {element.min} required by the referral "
                                f"profile{detail}, found {len(values)}", (f"{parent_expr}.{name}",)))
        if element.max is not None and len(values) > element.max:
            issues.append(Issue("error", "structure", f"{what}: at most {element.max} allowed by the referral "
                                f"profile, found {len(values)}", (f"{parent_expr}.{name}",)))
        for expr, value in values:
            _check_value(element, expr, value, issues)


def _slice_hint(element: _Element) -> str:
    if element.pattern is not None:
        return f" ({json.dumps(element.pattern, ensure_ascii=False)})"
    if element.extension_url:
        return f" (extension {element.extension_url})"
    return ""


def _check_value(element: _Element, expr: str, value: Any, issues: list[Issue]) -> None:
    if element.fixed is not None and value != element.fixed:
        issues.append(Issue("error", "value", f"{expr} must be {element.fixed!r} in a referral, not {value!r}",
                            (expr,)))
    if element.pattern is not None and element.segments[-1][1] is None and not _contains(value, element.pattern):
        issues.append(Issue("error", "value", f"{expr} must contain {json.dumps(element.pattern, ensure_ascii=False)}",
                            (expr,)))
    if element.binding_codes is not None:
        codings = _codings(value)
        inside = [c for c in codings if c.get("code") in element.binding_codes.get(c.get("system", ""), ())]
        if not inside:
            shown = ", ".join(f"{c.get('system')}|{c.get('code')}" for c in codings) or "no code"
            allowed = " | ".join(sorted(code for codes in element.binding_codes.values() for code in codes))
            issues.append(Issue("error", "code-invalid", f"{expr}: {shown} is not in {element.binding_url} "
                                f"({allowed})", (expr,)))
    if element.target_types and isinstance(value, dict):
        target = _reference_type(value)
        if target is None:
            issues.append(Issue("error", "value", f"{expr} must be a literal reference to "
                                f"{' | '.join(element.target_types)}", (expr,)))
        elif target not in element.target_types:
            issues.append(Issue("error", "value", f"{expr} refers to a {target}; a referral allows "
                                f"{' | '.join(element.target_types)} here", (expr,)))
    if element.extension_value and isinstance(value, dict) and element.extension_value not in value:
        issues.append(Issue("error", "value", f"{expr} ({element.extension_url}) needs {element.extension_value}",
                            (expr,)))


def _in_slice(element: _Element, value: Any) -> bool:
    if element.extension_url is not None:
        return isinstance(value, dict) and value.get("url") == element.extension_url
    if element.pattern is not None:
        return _contains(value, element.pattern)
    return False


def _instances(profile: Profile, resource: dict[str, Any],
               segments: tuple[tuple[str, str | None], ...]) -> list[tuple[str, Any]]:
    """(expression, value) of every instance of the element at ``segments`` (the root when empty)."""
    found: list[tuple[str, Any]] = [(profile.resource_type, resource)]
    path_ids = [profile.resource_type]
    for name, slice_name in segments:
        path_ids.append(f"{name}:{slice_name}" if slice_name else name)
        nxt: list[tuple[str, Any]] = []
        slice_element = None
        if slice_name:
            slice_element = next(e for e in profile.elements if e.id == ".".join(path_ids))
        for expr, parent in found:
            for i, value, is_list in _children(parent, name):
                if slice_element is not None and not _in_slice(slice_element, value):
                    continue
                nxt.append((f"{expr}.{name}" + (f"[{i}]" if is_list else ""), value))
        found = nxt
    return found


def _children(parent: Any, name: str) -> list[tuple[int, Any, bool]]:
    if not isinstance(parent, dict) or name not in parent:
        return []
    value = parent[name]
    if isinstance(value, list):
        return [(i, v, True) for i, v in enumerate(value)]
    return [(0, value, False)]


def _contains(value: Any, pattern: Any) -> bool:
    """FHIR pattern matching: every property of the pattern is in the value (lists: some item)."""
    if isinstance(pattern, dict):
        return isinstance(value, dict) and all(k in value and _contains(value[k], v) for k, v in pattern.items())
    if isinstance(pattern, list):
        return isinstance(value, list) and all(any(_contains(item, p) for item in value) for p in pattern)
    return value == pattern


def _codings(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, dict) and "coding" in value:
        return [c for c in value.get("coding") or [] if isinstance(c, dict)]
    if isinstance(value, dict) and "code" in value:
        return [value]
    return []


def _reference_type(value: dict[str, Any]) -> str | None:
    reference = value.get("reference")
    if not isinstance(reference, str):
        return None
    parts = [p for p in reference.split("?")[0].split("/") if p]
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    if len(parts) >= 2 and parts[-2][:1].isupper():
        return parts[-2]
    return None


@lru_cache(maxsize=4)
def referral_profile(directory: Path) -> Profile:
    return load_profile(directory / "StructureDefinition-yilian-referral.json")
