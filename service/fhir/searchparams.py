"""The search parameter registry: which parameters each resource type has, and how to find
their values. Everything that searches or indexes asks here; nothing hard-codes parameters.

Sources, merged once and cached:

1. ``definitions/search_parameters.json`` — the R4 core parameters, derived from the official
   package by ``python -m service.fhir.definitions.derive_search`` (committed, so the server
   needs no network). Union expressions are already split per resource type.
2. ``fhir_profiles/SearchParameter-*.json`` at the repository root — our own parameters as plain
   FHIR SearchParameter resources. Adding a parameter is adding a file; a custom parameter with
   the code of a core one replaces it for its base types.

Parameters whose base is ``Resource`` (``_id``, ``_lastUpdated``, ``_tag``, ``_profile``,
``_security``, ``_source``) apply to every type. ``_id`` and ``_lastUpdated`` are marked
``column``: they are answered from the resource table, never indexed.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from service.fhir.indexing.model import RESOURCE_TYPES
from service.fhir.indexing.paths import parts_for_base, root_of, split_union
from service.fhir.indexing.values import ADDRESS_PARTS, NAME_PARTS

log = logging.getLogger(__name__)

DEFINITIONS_FILE = Path(__file__).parent / "definitions" / "search_parameters.json"
#: Custom SearchParameter resources; ``YILIAN_PROFILES_DIR`` points elsewhere (tests, deployments).
PROFILES_DIR = Path(os.environ.get("YILIAN_PROFILES_DIR", Path(__file__).resolve().parents[2] / "fhir_profiles"))

COMMON = "Resource"
#: Written as ``"target": ["Any"]`` in search_parameters.json for a Reference(Any); expanded
#: on load to every resource type a reference may point at (all but Parameters).
ANY_TARGET = "Any"
ANY_TARGETS: tuple[str, ...] = tuple(sorted(RESOURCE_TYPES - {"Parameters"}))

#: Common parameters answered from columns of the resource table rather than index rows.
COLUMN_PARAMS = frozenset({"_id", "_lastUpdated"})
PARAM_TYPES = frozenset({"number", "date", "string", "token", "reference", "composite", "quantity", "uri", "special"})


@dataclass(frozen=True)
class Component:
    """One part of a composite parameter: the component parameter's code, and the expression
    that finds its value relative to each element the composite's own expression selects."""

    code: str
    expression: str


@dataclass(frozen=True)
class SearchParam:
    code: str
    type: str  # number|date|string|token|reference|composite|quantity|uri|special
    base: str  # the resource type ("Resource" for the common parameters)
    expression: str | None  # FHIRPath for this base only (a union already split)
    targets: tuple[str, ...]  # reference: resource types it may point at
    url: str
    description: str = ""
    column: bool = False  # answered from the resource table (_id, _lastUpdated), not the index
    components: tuple[Component, ...] = ()  # composite parameters only
    #: The index keys whose rows are this parameter's values; () means its own code. Set by
    #: :func:`share_string_rows`: ``phonetic`` reads the rows of ``name``, ``address`` also
    #: those of ``address-city`` ...
    index_codes: tuple[str, ...] = ()
    #: Parts of a HumanName / Address this parameter leaves to the parameters in index_codes.
    parts_left: tuple[str, ...] = ()

    @property
    def keys(self) -> tuple[str, ...]:
        """The ``param`` values of the index rows a search of this parameter reads."""
        return self.index_codes or (self.code,)

    @property
    def writes_rows(self) -> bool:
        """False when another parameter's rows are this one's (same expression)."""
        return self.code in self.keys


class Registry:
    """Parameters per resource type: {type: {code: SearchParam}}, common ones under "Resource"."""

    def __init__(self, by_type: dict[str, dict[str, SearchParam]]) -> None:
        self.by_type = by_type
        common = by_type.get(COMMON, {})
        self._merged: dict[str, dict[str, SearchParam]] = {}
        for rt in sorted(RESOURCE_TYPES | (by_type.keys() - {COMMON})):
            self._merged[rt] = share_string_rows({**common, **by_type.get(rt, {})})

    def params_for(self, resource_type: str) -> dict[str, SearchParam]:
        return self._merged.get(resource_type, {})

    def supported_types(self) -> list[str]:
        return list(self._merged)


def share_string_rows(params: dict[str, SearchParam]) -> dict[str, SearchParam]:
    """The string parameters of one type, sharing index rows instead of writing them twice.

    * Parameters with the same expression (``Patient.phonetic`` and ``Patient.name``, both
      ``Patient.name``) share one set of rows, written under the first code in sorted order.
    * A parameter over names or addresses (``address``: ``Patient.address``) leaves a part to
      the parameter whose expression is exactly that part (``address-city``:
      ``Patient.address.city``) and reads that parameter's rows as well as its own.

    Every search sees the values it saw before (each row now exists once); a Patient with a
    name and an address writes 20 index rows instead of 29. Driven by the expressions alone:
    a custom parameter with another expression shares nothing.
    """
    strings = sorted((p for p in params.values() if p.type == "string" and p.expression and not p.column),
                     key=lambda p: p.code)
    owners: dict[str, SearchParam] = {}  # expression -> the parameter that writes its rows
    for p in strings:
        owners.setdefault(p.expression or "", p)
    parts = dict.fromkeys((*NAME_PARTS, *ADDRESS_PARTS))
    shared = dict(params)
    for expression, owner in owners.items():
        left = {} if "|" in expression else {
            part: owners[f"{expression}.{part}"].code for part in parts if f"{expression}.{part}" in owners}
        if left:
            owner = replace(owner, index_codes=(owner.code, *dict.fromkeys(left.values())), parts_left=tuple(left))
        shared[owner.code] = owner
    for p in strings:
        owner = shared[owners[p.expression or ""].code]
        if owner.code != p.code:
            shared[p.code] = replace(p, index_codes=owner.keys)
    return shared


def _param_from_definition(base: str, code: str, d: dict[str, Any]) -> SearchParam:
    return SearchParam(
        code=code,
        type=d["type"],
        base=base,
        expression=d.get("expression"),
        targets=ANY_TARGETS if d.get("target") == [ANY_TARGET] else tuple(d.get("target", ())),
        url=d.get("url", ""),
        description=d.get("description", ""),
        column=bool(d.get("column", False)),
        components=tuple(Component(c["code"], c["expression"]) for c in d.get("components", ())),
    )


def params_from_resource(
    sp: dict[str, Any], source: str = "", codes_by_url: dict[str, str] | None = None
) -> list[SearchParam]:
    """A FHIR SearchParameter resource as one SearchParam per base type.

    ``codes_by_url`` names the parameters a composite's components refer to (by canonical url);
    a url not in it is named by its last path segment.

    Raises ValueError when it lacks what searching needs, so a broken custom file stops the
    server at start-up instead of silently not matching.
    """
    where = source or sp.get("url", "SearchParameter")
    if sp.get("resourceType") != "SearchParameter":
        raise ValueError(f"{where}: not a SearchParameter")
    code, type_, bases = sp.get("code"), sp.get("type"), sp.get("base")
    if not isinstance(code, str) or not code or type_ not in PARAM_TYPES or not isinstance(bases, list) or not bases:
        raise ValueError(f"{where}: needs code, base[] and a valid type")
    expression = sp.get("expression")
    if type_ not in ("special", "composite") and not expression:
        raise ValueError(f"{where}: needs an expression")
    out = []
    for base in bases:
        expr = expression
        if expression:
            parts = parts_for_base(expression, base)
            expr = " | ".join(parts)
            foreign = [p for p in parts if root_of(p) in RESOURCE_TYPES and root_of(p) != base]
            if base != COMMON and foreign:
                log.warning("%s: expression %r does not start at %s", where, expression, base)
        targets = tuple(sp.get("target", ()))
        if expr and type_ == "reference":
            narrowed = resolve_targets(expr)
            targets = narrowed or targets
        out.append(
            SearchParam(
                code=code,
                type=type_,
                base=base,
                expression=expr,
                targets=targets,
                url=sp.get("url", ""),
                description=short_description(sp.get("description", ""), base),
                column=base == COMMON and code in COLUMN_PARAMS,
                components=tuple(
                    Component(_component_code(c.get("definition", ""), codes_by_url), c.get("expression", ""))
                    for c in sp.get("component", ())
                ),
            )
        )
    return out


def _component_code(definition: str, codes_by_url: dict[str, str] | None) -> str:
    if codes_by_url and definition in codes_by_url:
        return codes_by_url[definition]
    return definition.rsplit("/", 1)[-1]


def resolve_targets(expression: str) -> tuple[str, ...]:
    """Target types implied by ``where(resolve() is X)`` in every union member, else ()."""
    found: list[str] = []
    for part in split_union(expression):
        marker = "resolve() is "
        i = part.find(marker)
        if i < 0:
            return ()
        found.append(part[i + len(marker) :].split(")")[0].strip())
    return tuple(dict.fromkeys(found))


def short_description(description: str, base: str) -> str:
    """One line: for a multi-resource description, the line about ``base``; else the first line.

    Core descriptions of shared parameters read "Multiple Resources: * [Patient](patient.html):
    A patient's name ...". Clipped to 200 characters.
    """
    lines = [ln.strip() for ln in description.replace("\r", "").split("\n") if ln.strip()]
    text = lines[0] if lines else ""
    prefix = f"* [{base}]("
    for ln in lines:
        if ln.startswith(prefix):
            text = ln.split("):", 1)[-1].strip()
            break
    return text if len(text) <= 200 else text[:197].rstrip() + "..."


def load_registry(definitions_file: Path = DEFINITIONS_FILE, profiles_dir: Path | None = PROFILES_DIR) -> Registry:
    """Read the core definitions and every custom SearchParameter file (not cached)."""
    raw: dict[str, dict[str, dict[str, Any]]] = json.loads(definitions_file.read_text(encoding="utf-8"))
    by_type: dict[str, dict[str, SearchParam]] = {
        rt: {code: _param_from_definition(rt, code, d) for code, d in params.items()} for rt, params in raw.items()
    }
    codes_by_url = {p.url: p.code for params in by_type.values() for p in params.values() if p.url}
    if profiles_dir is not None and not profiles_dir.is_dir():
        log.warning("no custom search parameters: %s is not a directory (set YILIAN_PROFILES_DIR)", profiles_dir)
    elif profiles_dir is not None:
        for path in sorted(profiles_dir.glob("SearchParameter-*.json")):
            sp = json.loads(path.read_text(encoding="utf-8"))
            for p in params_from_resource(sp, source=path.name, codes_by_url=codes_by_url):
                if p.base != COMMON and p.base not in RESOURCE_TYPES:
                    raise ValueError(f"{path.name}: unknown base {p.base}")
                if p.code in by_type.get(p.base, {}):
                    log.info("%s replaces the core parameter %s.%s", path.name, p.base, p.code)
                by_type.setdefault(p.base, {})[p.code] = p
    return Registry(by_type)


@lru_cache(maxsize=1)
def registry() -> Registry:
    """The registry of this process, loaded on first use."""
    return load_registry()


def params_for(resource_type: str) -> dict[str, SearchParam]:
    """Every parameter of ``resource_type``: common, core and custom; {} for unknown types."""
    return registry().params_for(resource_type)


def get_param(resource_type: str, code: str) -> SearchParam | None:
    return registry().params_for(resource_type).get(code)


def supported_types() -> list[str]:
    """Every R4 resource type, sorted. All are searchable at least by the common parameters."""
    return registry().supported_types()
