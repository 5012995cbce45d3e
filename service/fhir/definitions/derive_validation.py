"""Derive the validation tables shipped with Yilian from the official FHIR R4 definitions.

Run as ``python -m service.fhir.definitions.derive_validation``. The script fetches the npm
package ``hl7.fhir.r4.examples@4.0.1`` with ``npm pack`` into ``<repo>/.cache/npm/`` (once),
reads its StructureDefinitions, ValueSets and CodeSystems and writes three compact JSON files
next to this module. They are committed: at run time the server needs only Python, never npm
or the network.

Why derived tables and not the models alone: ``fhir.resources`` checks structure and primitive
formats, but it does not check required code bindings, nor the target types of References, and
its R4B models differ from R4 for a few resource types. The files fill those gaps:

``required_bindings.json``
    ``{"paths": {element path: value set url}, "valueSets": {url: {system: [codes]}}}``.
    Paths are definition paths (``Patient.contact.gender``, ``Identifier.use``,
    ``Observation.value[x]``) of every resource type and complex datatype whose binding has
    strength ``required`` and whose value set can be expanded from the package alone. The codes
    are kept per code system (sorted) because a Coding/CodeableConcept is only checked against
    the systems the value set draws on; value sets are stored once, not per path.
``reference_targets.json``
    ``{element path: [allowed resource types]}`` for every ``Reference`` element whose targets
    are restricted. Elements that may reference any type (``Reference(Any)``/``Resource``) are
    left out: nothing to check. ``canonical`` elements are never listed.
``elements.json``
    The shape of every resource type and complex datatype, which the validator walks:
    ``{"types": {Type: {"kind", "base", "elements": {name: [type, min, isList, children?]}}},
    "primitives": {type: [json kind, regex]}, "resourceTypes": [...], "r4bIncompatible": [...]}``.
    ``type`` is a type code, a list of codes for a choice element (``value[x]``) or
    ``"#Path"`` for a ``contentReference``. The ``id``/``extension`` elements every element
    carries, the ``modifierExtension`` of every BackboneElement, and the elements every resource
    inherits from Resource/DomainResource are left out (the validator adds them back) to keep the
    file small. ``r4bIncompatible`` lists the R4 resource types that the installed
    ``fhir.resources.R4B`` models lack or model differently; the validator checks those against
    these R4 tables instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

PACKAGE = "hl7.fhir.r4.examples"
VERSION = "4.0.1"
HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[2]
DEFAULT_CACHE = REPO_ROOT / ".cache" / "npm"

REQUIRED_BINDINGS_FILE = HERE / "required_bindings.json"
REFERENCE_TARGETS_FILE = HERE / "reference_targets.json"
ELEMENTS_FILE = HERE / "elements.json"

SD_BASE = "http://hl7.org/fhir/StructureDefinition/"
FHIR_TYPE_EXT = "http://hl7.org/fhir/StructureDefinition/structuredefinition-fhir-type"
REGEX_EXT = "http://hl7.org/fhir/StructureDefinition/regex"
# Elements every resource inherits; the validator adds them from the Resource/DomainResource tables.
RESOURCE_BASE_ELEMENTS = frozenset(
    {"id", "meta", "implicitRules", "language", "text", "contained", "extension", "modifierExtension"})
# The JSON value kinds of the FHIR primitives (http://hl7.org/fhir/R4/json.html#primitive).
JSON_KIND = {"boolean": "boolean", "integer": "integer", "positiveInt": "integer", "unsignedInt": "integer",
             "decimal": "decimal"}


# -- fetching the package ---------------------------------------------------------------------

def ensure_examples_package(cache_dir: Path | None = None) -> Path:
    """Return the extracted ``package/`` folder of the examples package, fetching it if needed.

    Uses ``npm pack`` (the ordinary npm client, so the configured registry and proxy apply) and
    extracts the tarball next to it. Raises ``FileNotFoundError`` when npm is not installed, so
    callers (the conformance test) can tell "no npm" from a real failure.
    """
    cache_dir = Path(os.environ.get("YILIAN_NPM_CACHE", cache_dir or DEFAULT_CACHE))
    target = cache_dir / f"{PACKAGE}-{VERSION}"
    package_dir = target / "package"
    if (package_dir / "package.json").is_file():
        return package_dir
    tarball = cache_dir / f"{PACKAGE}-{VERSION}.tgz"
    if not tarball.is_file():
        npm = shutil.which("npm")
        if npm is None:
            raise FileNotFoundError("npm is not installed; it is needed to fetch the FHIR definitions")
        cache_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([npm, "pack", f"{PACKAGE}@{VERSION}", "--silent"], cwd=cache_dir, check=True,
                       stdout=subprocess.DEVNULL)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with tarfile.open(tarball) as tar:
        tar.extractall(partial, filter="data")
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)  # atomic enough: a half-extracted folder is never mistaken for the package
    return package_dir


def _read_all(package_dir: Path, prefix: str) -> Iterator[dict[str, Any]]:
    for path in sorted(package_dir.glob(f"{prefix}-*.json")):
        yield json.loads(path.read_text(encoding="utf-8"))


# -- StructureDefinitions -------------------------------------------------------------------------

class Definitions:
    """The package's definitions, indexed the way the derivations below need them."""

    def __init__(self, package_dir: Path) -> None:
        self.structures = {sd["url"]: sd for sd in _read_all(package_dir, "StructureDefinition")}
        self.value_sets = {vs["url"]: vs for vs in _read_all(package_dir, "ValueSet")}
        self.code_systems = {cs["url"]: cs for cs in _read_all(package_dir, "CodeSystem")}
        # The base definitions of resources and complex datatypes (no profiles, no logical models).
        self.types: dict[str, dict[str, Any]] = {
            sd["type"]: sd for sd in self.structures.values()
            if sd.get("kind") in ("resource", "complex-type") and sd.get("derivation") != "constraint"}
        self.primitives = {sd["type"]: sd for sd in self.structures.values() if sd.get("kind") == "primitive-type"}

    def resource_types(self) -> list[str]:
        """Concrete R4 resource types (Resource and DomainResource are abstract)."""
        return sorted(t for t, sd in self.types.items() if sd["kind"] == "resource" and not sd.get("abstract"))

    def type_of_profile(self, url: str) -> str:
        """The resource type a targetProfile names (profiles resolve to the type they constrain)."""
        sd = self.structures.get(url.split("|")[0])
        if sd is not None:
            return sd["type"]
        return url.rsplit("/", 1)[-1]


def _type_code(type_entry: dict[str, Any]) -> str:
    """The FHIR type of one ``ElementDefinition.type`` entry.

    The ``value`` of primitives and ``Element.id`` are typed with FHIRPath system types; the
    ``structuredefinition-fhir-type`` extension then gives the FHIR type.
    """
    code = type_entry["code"]
    if code.startswith("http://hl7.org/fhirpath/System."):
        for ext in type_entry.get("extension", []):
            if ext.get("url") == FHIR_TYPE_EXT:
                return ext.get("valueUrl") or ext.get("valueUri") or "string"
        return code.rsplit(".", 1)[-1].lower()
    return code


def _elements(sd: dict[str, Any]) -> list[dict[str, Any]]:
    return sd["snapshot"]["element"][1:]  # the first element is the type itself


def _is_generic(sd: dict[str, Any], element: dict[str, Any]) -> bool:
    """``id``/``extension`` of every element, and a resource's inherited elements.

    They are the same everywhere, so elements.json leaves them out and the validator adds them.
    """
    parts = element["path"].split(".")
    if parts[-1] in ("id", "extension") and len(parts) > 1:
        return True
    if parts[-1] == "modifierExtension" and len(parts) > 2:
        return True  # only BackboneElements nest this deep with a modifierExtension
    return sd["kind"] == "resource" and len(parts) == 2 and parts[1] in RESOURCE_BASE_ELEMENTS \
        and sd["type"] not in ("Resource", "DomainResource")


def element_table(defs: Definitions) -> dict[str, Any]:
    """The ``types`` part of elements.json: per type, a tree of its elements.

    Each element is ``name: [type, min, isList]``; an element with children of its own (a
    BackboneElement, or an ``Element`` inside a datatype such as ``Timing.repeat``) carries them
    as a fourth item, shaped the same way. Nesting instead of full paths keeps the file small.
    """
    types: dict[str, Any] = {}
    for name, sd in sorted(defs.types.items()):
        root: dict[str, Any] = {}
        nodes: dict[str, dict[str, Any]] = {name: root}
        for element in _elements(sd):
            if _is_generic(sd, element):
                continue
            parent, _, child = element["path"].rpartition(".")
            if "contentReference" in element:
                type_spec: Any = element["contentReference"]
            else:
                codes = [_type_code(t) for t in element.get("type", [])]
                type_spec = codes if child.endswith("[x]") else codes[0]
            entry: list[Any] = [type_spec, element.get("min", 0), 0 if element.get("max") == "1" else 1]
            nodes[parent][child] = entry
            nodes[element["path"]] = {}
            if type_spec in ("BackboneElement", "Element"):
                entry.append(nodes[element["path"]])
        base = sd.get("baseDefinition", "").rsplit("/", 1)[-1] or None
        types[name] = {"kind": sd["kind"], "base": base, "elements": root}
    return types


def primitive_table(defs: Definitions) -> dict[str, list[str]]:
    """Per primitive type: the JSON kind its values take and the regex from its definition."""
    table: dict[str, list[str]] = {}
    for name, sd in sorted(defs.primitives.items()):
        regex = ""
        for element in _elements(sd):
            if element["path"] == f"{name}.value":
                for ext in element["type"][0].get("extension", []):
                    if ext.get("url") == REGEX_EXT:
                        regex = ext["valueString"]
        table[name] = [JSON_KIND.get(name, "string"), regex]
    return table


# -- value sets -----------------------------------------------------------------------------------

class CannotExpand(Exception):
    """A value set whose content is not fully known from the package (filters, external systems)."""


def _concept_codes(concepts: Iterable[dict[str, Any]]) -> Iterator[str]:
    for concept in concepts:
        yield concept["code"]
        yield from _concept_codes(concept.get("concept", []))


def _system_codes(defs: Definitions, system: str) -> set[str]:
    cs = defs.code_systems.get(system)
    if cs is None:
        raise CannotExpand(f"code system {system} is not in the package (external)")
    if cs.get("content") != "complete":
        raise CannotExpand(f"code system {system} has content '{cs.get('content')}'")
    return set(_concept_codes(cs.get("concept", [])))


def _compose_part(defs: Definitions, part: dict[str, Any], seen: tuple[str, ...]) -> dict[str, set[str]]:
    """The codes of one compose.include/exclude entry, per system."""
    if part.get("filter"):
        raise CannotExpand("uses a filter")
    result: dict[str, set[str]] = {}
    if part.get("valueSet"):
        if part.get("system"):
            raise CannotExpand("intersects a system with value sets")
        for url in part["valueSet"]:
            for system, codes in expand_value_set(defs, url, seen).items():
                result.setdefault(system, set()).update(codes)
        return result
    system = part.get("system")
    if not system:
        raise CannotExpand("include without a system")
    if part.get("concept"):
        result[system] = {c["code"] for c in part["concept"]}
    else:
        result[system] = _system_codes(defs, system)
    return result


def expand_value_set(defs: Definitions, url: str, seen: tuple[str, ...] = ()) -> dict[str, set[str]]:
    """Expand a value set statically: ``{system: codes}``, or raise CannotExpand saying why."""
    url = url.split("|")[0]
    if url in seen:
        raise CannotExpand("includes itself")
    vs = defs.value_sets.get(url)
    if vs is None:
        raise CannotExpand("value set is not in the package (external)")
    compose = vs.get("compose")
    if not compose:
        raise CannotExpand("has no compose")
    result: dict[str, set[str]] = {}
    for include in compose.get("include", []):
        for system, codes in _compose_part(defs, include, seen + (url,)).items():
            result.setdefault(system, set()).update(codes)
    for exclude in compose.get("exclude", []):
        for system, codes in _compose_part(defs, exclude, seen + (url,)).items():
            result.get(system, set()).difference_update(codes)
    if not any(result.values()):
        raise CannotExpand("expands to no codes")
    return result


def required_bindings(defs: Definitions) -> tuple[dict[str, Any], list[tuple[str, str, str]]]:
    """The content of required_bindings.json, and the (path, value set, reason) skipped."""
    paths: dict[str, str] = {}
    value_sets: dict[str, dict[str, list[str]]] = {}
    skipped: list[tuple[str, str, str]] = []
    failures: dict[str, str] = {}
    for sd in defs.types.values():
        for element in _elements(sd):
            binding = element.get("binding") or {}
            if binding.get("strength") != "required" or not binding.get("valueSet"):
                continue
            url = binding["valueSet"].split("|")[0]
            if url not in value_sets and url not in failures:
                try:
                    value_sets[url] = {s: sorted(c) for s, c in sorted(expand_value_set(defs, url).items()) if c}
                except CannotExpand as exc:
                    failures[url] = str(exc)
            if url in failures:
                skipped.append((element["path"], url, failures[url]))
            else:
                paths[element["path"]] = url
    used = set(paths.values())
    return {"paths": paths, "valueSets": {u: v for u, v in value_sets.items() if u in used}}, skipped


# -- references -----------------------------------------------------------------------------------

def reference_targets(defs: Definitions) -> dict[str, list[str]]:
    """Element path -> allowed target types, for Reference elements restricted to some types."""
    targets: dict[str, list[str]] = {}
    for sd in defs.types.values():
        for element in _elements(sd):
            for type_entry in element.get("type", []):
                if type_entry.get("code") != "Reference":
                    continue  # canonical(...) targets are not checked, by design
                profiles = type_entry.get("targetProfile") or []
                allowed = {defs.type_of_profile(p) for p in profiles}
                if not allowed or allowed & {"Resource", "Any", "DomainResource"}:
                    continue
                targets[element["path"]] = sorted(allowed)
    return targets


# -- fhir.resources R4B compatibility ------------------------------------------------------------

def _json_names(element: dict[str, Any]) -> list[str]:
    name = element["path"].rsplit(".", 1)[-1]
    if name.endswith("[x]"):
        return [name[:-3] + _upper_first(_type_code(t)) for t in element.get("type", [])]
    return [name]


def _upper_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def r4b_incompatible(defs: Definitions) -> dict[str, str]:
    """Resource types whose R4B model is missing or lacks R4 elements, with the first reason.

    Such resources cannot go through ``fhir.resources.R4B``: a valid R4 instance would be
    rejected. Elements R4B merely adds are tolerated (R4B accepts more, not less).
    """
    from fhir.resources.R4B import get_fhir_model_class

    result: dict[str, str] = {}
    for name in defs.resource_types():
        try:
            model = get_fhir_model_class(name)
        except (KeyError, ValueError):
            result[name] = "no R4B model"
            continue
        missing = _missing_in_model(defs.types[name], model, get_fhir_model_class)
        if missing:
            result[name] = f"R4B lacks {missing}"
    return result


def _missing_in_model(sd: dict[str, Any], model: Any, model_class: Any) -> str | None:
    """The first R4 element (JSON name) of ``sd`` that the R4B model tree does not define."""
    by_parent: dict[str, list[dict[str, Any]]] = {}
    for element in _elements(sd):
        by_parent.setdefault(element["path"].rsplit(".", 1)[0], []).append(element)

    def check(path: str, cls: Any) -> str | None:
        fields = {f.alias or n: f for n, f in cls.model_fields.items()}
        for element in by_parent.get(path, []):
            for json_name in _json_names(element):
                if json_name not in fields:
                    return f"{element['path']} ({json_name})"
            if element["path"] in by_parent and "contentReference" not in element:
                match = re.search(r"abc\.(\w+)Type", str(fields[_json_names(element)[0]].annotation))
                if match:
                    found = check(element["path"], model_class(match.group(1)))
                    if found:
                        return found
        return None

    return check(sd["type"], model)


# -- writing --------------------------------------------------------------------------------------

def write_compact(path: Path, data: Any) -> int:
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n"
    path.write_text(text, encoding="utf-8")
    return len(text.encode("utf-8"))


def main() -> int:
    """Derive and write the three tables, printing what was covered and what was skipped."""
    package_dir = ensure_examples_package()
    defs = Definitions(package_dir)
    bindings, skipped = required_bindings(defs)
    targets = reference_targets(defs)
    incompatible = r4b_incompatible(defs)
    elements = {"types": element_table(defs), "primitives": primitive_table(defs),
                "resourceTypes": defs.resource_types(), "r4bIncompatible": sorted(incompatible)}

    sizes = {REQUIRED_BINDINGS_FILE: write_compact(REQUIRED_BINDINGS_FILE, bindings),
             REFERENCE_TARGETS_FILE: write_compact(REFERENCE_TARGETS_FILE, targets),
             ELEMENTS_FILE: write_compact(ELEMENTS_FILE, elements)}

    print(f"package: {package_dir}")
    print(f"types: {len(defs.types)} resource/datatype definitions, {len(elements['resourceTypes'])} resource types")
    print(f"required bindings: {len(bindings['paths'])} element paths over {len(bindings['valueSets'])} value sets")
    print(f"skipped required bindings: {len(skipped)} element paths "
          f"({len({url for _, url, _ in skipped})} value sets cannot be expanded statically)")
    for (url, reason), count in sorted(Counter((url, reason) for _, url, reason in skipped).items()):
        where = ", ".join(p for p, u, _ in skipped if u == url)
        print(f"  - {url}: {reason} [{count}: {where}]")
    print(f"reference targets: {len(targets)} restricted Reference elements")
    print(f"R4 resource types checked without fhir.resources.R4B: {len(incompatible)}")
    for name, reason in sorted(incompatible.items()):
        print(f"  - {name}: {reason}")
    for path, size in sizes.items():
        print(f"wrote {path.relative_to(REPO_ROOT)} ({size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
