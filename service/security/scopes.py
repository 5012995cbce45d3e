"""SMART on FHIR scopes (v1 and v2) and the :class:`ScopePolicy` that enforces them.

Grammar (https://hl7.org/fhir/smart-app-launch/scopes-and-launch-context.html)::

    ( patient | user | system ) / ( ResourceType | * ) . permissions [ ? param=value(&param=value)* ]

* v2 permissions are the letters ``c r u d s`` in that order (``rs``, ``cruds``, ``cu`` ...);
  v1 ``read`` means ``rs``, ``write`` means ``cud`` and ``*`` means ``cruds``.
* A scope may be restricted by token search parameters of its type:
  ``patient/Observation.rs?category=laboratory`` (values ``code``, ``system|code``, ``|code``,
  ``system|``; ``a,b`` means either; several parameters must all match).
* ``patient/`` scopes only count when the token carries a patient context, and then only
  for that patient's compartment (CompartmentDefinition/patient of R4, plus Task); types
  outside the compartment are readable only when they carry no patient data (directory
  types such as Organization or Practitioner).
* Other scopes (``launch/patient``, ``offline_access``, ``yilian/admin`` ...) grant no
  access to resources by themselves.

The policy answers the three questions of :class:`service.fhir.hooks.AccessPolicy`:
``authorize`` (may this interaction happen at all), ``visible`` (an SQL clause: which rows
the restricted and patient scopes let the caller see, so search, read, include and history
all obey it) and ``check_write`` (does the changed resource stay inside the scope).

Interactions map to permissions: read/vread → r, search → s, history → r and s,
create → c, update/patch → u, delete → d.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qsl

import sqlalchemy as sa

from service.fhir.access import AccessContext
from service.fhir.errors import Forbidden
from service.fhir.tables import ReferenceIndex
from service.fhir.token_sets import token_rows

CONTEXTS = ("patient", "user", "system")
V1_PERMISSIONS = {"read": "rs", "write": "cud", "*": "cruds"}
PERMISSION_ORDER = "cruds"
INTERACTION_PERMISSIONS = {"read": "r", "vread": "r", "search": "s", "history": "rs", "create": "c",
                           "update": "u", "patch": "u", "delete": "d"}

#: Scopes that are not about resources but that we understand.
LAUNCH_PATIENT = "launch/patient"
ADMIN_SCOPE = "yilian/admin"  # the /admin API (clients and users)
INTROSPECT_SCOPE = "yilian/introspect"  # may introspect tokens issued to other clients
USER_ONLY_SCOPES = frozenset({LAUNCH_PATIENT, "offline_access", "online_access"})
BACKEND_ONLY_SCOPES = frozenset({INTROSPECT_SCOPE})
OTHER_SCOPES = USER_ONLY_SCOPES | BACKEND_ONLY_SCOPES | {ADMIN_SCOPE}

#: R4 CompartmentDefinition/patient: the reference parameters that put a resource in a
#: patient's compartment. Task is added: it is not in R4's definition but carries the
#: patient of a referral (``Task.for``).
PATIENT_COMPARTMENT: dict[str, tuple[str, ...]] = {
    "Account": ("subject",), "AdverseEvent": ("subject",),
    "AllergyIntolerance": ("patient", "recorder", "asserter"), "Appointment": ("actor",),
    "AppointmentResponse": ("actor",), "AuditEvent": ("patient",), "Basic": ("patient", "author"),
    "BodyStructure": ("patient",), "CarePlan": ("patient", "performer"), "CareTeam": ("patient", "participant"),
    "ChargeItem": ("subject",), "Claim": ("patient", "payee"), "ClaimResponse": ("patient",),
    "ClinicalImpression": ("subject",), "Communication": ("subject", "sender", "recipient"),
    "CommunicationRequest": ("subject", "sender", "recipient", "requester"),
    "Composition": ("subject", "author", "attester"), "Condition": ("patient", "asserter"),
    "Consent": ("patient",), "Coverage": ("policy-holder", "subscriber", "beneficiary", "payor"),
    "CoverageEligibilityRequest": ("patient",), "CoverageEligibilityResponse": ("patient",),
    "DetectedIssue": ("patient",), "DeviceRequest": ("subject", "performer"), "DeviceUseStatement": ("subject",),
    "DiagnosticReport": ("subject",), "DocumentManifest": ("subject", "author", "recipient"),
    "DocumentReference": ("subject", "author"), "Encounter": ("patient",), "EnrollmentRequest": ("subject",),
    "EpisodeOfCare": ("patient",), "ExplanationOfBenefit": ("patient", "payee"),
    "FamilyMemberHistory": ("patient",), "Flag": ("patient",), "Goal": ("patient",), "Group": ("member",),
    "ImagingStudy": ("patient",), "Immunization": ("patient",), "ImmunizationEvaluation": ("patient",),
    "ImmunizationRecommendation": ("patient",), "Invoice": ("subject", "patient", "recipient"),
    "List": ("subject", "source"), "MeasureReport": ("patient",), "Media": ("subject",),
    "MedicationAdministration": ("patient", "performer", "subject"),
    "MedicationDispense": ("subject", "patient", "receiver"), "MedicationRequest": ("subject",),
    "MedicationStatement": ("subject",), "MolecularSequence": ("patient",), "NutritionOrder": ("patient",),
    "Observation": ("subject", "performer"), "Patient": ("link",), "Person": ("patient",),
    "Procedure": ("patient", "performer"), "Provenance": ("patient",), "QuestionnaireResponse": ("subject", "author"),
    "RelatedPerson": ("patient",), "RequestGroup": ("subject", "participant"), "ResearchSubject": ("individual",),
    "RiskAssessment": ("subject",), "Schedule": ("actor",), "ServiceRequest": ("subject", "performer"),
    "Specimen": ("subject",), "SupplyDelivery": ("patient",), "SupplyRequest": ("subject",),
    "Task": ("patient", "subject"), "VisionPrescription": ("patient",),
}
_COMPARTMENT_PARAMS = tuple(sorted({p for params in PATIENT_COMPARTMENT.values() for p in params}))
#: Types that hold no patient data: a patient-context token may read them (practitioner
#: directories, organizations, terminology, medication definitions).
DIRECTORY_TYPES = frozenset({
    "Organization", "OrganizationAffiliation", "Practitioner", "PractitionerRole", "Location",
    "HealthcareService", "Endpoint", "Medication", "MedicationKnowledge", "Substance", "ValueSet",
    "CodeSystem", "ConceptMap", "StructureDefinition", "SearchParameter", "CapabilityStatement",
    "Questionnaire", "PlanDefinition", "ActivityDefinition",
})

_RESOURCE_SCOPE = re.compile(r"^(patient|user|system)/([A-Z][A-Za-z]*|\*)\.([a-z*]+)(?:\?(.*))?$")
_V2_PERMISSIONS = re.compile(r"^c?r?u?d?s?$")

REF = ReferenceIndex.__table__


class ScopeError(ValueError):
    """A scope string that is malformed or that we cannot enforce."""


@dataclass(frozen=True)
class TokenRestriction:
    """``param=value[,value]``: the resource must have a ``param`` index row matching a value."""

    param: str
    values: tuple[tuple[str | None, str | None], ...]  # (system, code); None: any

    def clause(self, resource_type: str, id_col: sa.ColumnElement) -> sa.ColumnElement:
        t = token_rows(resource_type)
        tests = []
        for system, code in self.values:
            parts = []
            if system is not None:
                parts.append(t.c.system == system)
            if code is not None:
                parts.append(t.c.code == code)
            tests.append(sa.and_(*parts))
        return sa.exists().where(t.c.resource_type == resource_type, t.c.resource_id == id_col,
                                 t.c.param == self.param, sa.or_(*tests))

    def matches(self, token_rows: list[dict[str, Any]]) -> bool:
        for row in token_rows:
            if row["param"] != self.param:
                continue
            for system, code in self.values:
                if (system is None or row["system"] == system) and (code is None or row["code"] == code):
                    return True
        return False


@dataclass(frozen=True)
class ResourceScope:
    text: str
    context: str  # patient | user | system
    resource_type: str  # a type or "*"
    permissions: frozenset[str]  # subset of c r u d s
    restrictions: tuple[TokenRestriction, ...] = ()

    def applies_to(self, resource_type: str) -> bool:
        return self.resource_type == "*" or self.resource_type == resource_type

    def covers(self, other: ResourceScope) -> bool:
        """True when granting ``self`` already allows everything ``other`` asks for."""
        return (self.context == other.context
                and self.resource_type in ("*", other.resource_type)
                and other.permissions <= self.permissions
                and set(self.restrictions) <= set(other.restrictions))


def parse_scope(text: str) -> ResourceScope | str:
    """A :class:`ResourceScope`, or the text itself for a known non-resource scope.
    Raises ScopeError for anything else."""
    if text in OTHER_SCOPES:
        return text
    match = _RESOURCE_SCOPE.match(text)
    if match is None:
        raise ScopeError(f"'{text}' is not a SMART scope this server understands")
    context, resource_type, permission_text, query = match.groups()
    if resource_type != "*":
        from service.fhir.validation import known_resource_types

        if resource_type not in known_resource_types():
            raise ScopeError(f"'{text}': {resource_type} is not a FHIR R4 resource type")
    if permission_text in V1_PERMISSIONS:
        permissions = frozenset(V1_PERMISSIONS[permission_text])
    elif permission_text and _V2_PERMISSIONS.match(permission_text):
        permissions = frozenset(permission_text)
    else:
        raise ScopeError(f"'{text}': permissions are read, write, * or the letters c r u d s in that order")
    restrictions = _parse_restrictions(text, resource_type, query) if query is not None else ()
    return ResourceScope(text, context, resource_type, permissions, restrictions)


def _parse_restrictions(text: str, resource_type: str, query: str) -> tuple[TokenRestriction, ...]:
    from service.fhir.searchparams import get_param

    if resource_type == "*":
        raise ScopeError(f"'{text}': a search restriction needs a resource type, not *")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise ScopeError(f"'{text}': the restriction is not a query string") from None
    restrictions = []
    for name, value in pairs:
        param = get_param(resource_type, name)
        if param is None or param.type != "token":
            raise ScopeError(f"'{text}': only token search parameters of {resource_type} can restrict a scope "
                             f"('{name}' is not one)")
        values = tuple(_token_value(v) for v in value.split(",") if v)
        if not values:
            raise ScopeError(f"'{text}': '{name}' has no value")
        restrictions.append(TokenRestriction(name, values))
    return tuple(sorted(restrictions, key=lambda r: (r.param, r.values)))


def _token_value(value: str) -> tuple[str | None, str | None]:
    if "|" not in value:
        return None, value
    system, _, code = value.partition("|")
    return system, code or None


def parse_scopes(scopes: Iterable[str], *, strict: bool = True) -> list[ResourceScope | str]:
    """Parse several scopes; with ``strict`` a bad one raises, otherwise it is dropped."""
    parsed: list[ResourceScope | str] = []
    for text in scopes:
        try:
            parsed.append(parse_scope(text))
        except ScopeError:
            if strict:
                raise
    return parsed


def grantable(requested: str | None, allowed: Iterable[str], *, kind: str) -> list[str]:
    """The scopes to grant: each requested scope that an allowed one covers, fit for the kind
    of token (``backend``: system/ scopes; ``user``: patient/ and user/ scopes and the launch
    and refresh scopes). No requested scope means every allowed scope fit for the kind.
    Unknown or not allowed scopes are dropped (RFC 6749 3.3 lets us grant less)."""
    allowed_parsed = parse_scopes(allowed, strict=False)
    wanted = requested.split() if requested else [a if isinstance(a, str) else a.text for a in allowed_parsed]
    granted: list[str] = []
    for text in dict.fromkeys(wanted):
        try:
            scope = parse_scope(text)
        except ScopeError:
            continue
        if isinstance(scope, str):
            fits = scope in allowed_parsed and (
                (kind == "user" and scope in USER_ONLY_SCOPES)
                or (kind == "backend" and (scope in BACKEND_ONLY_SCOPES or scope == ADMIN_SCOPE)))
        else:
            fits = ((scope.context == "system") == (kind == "backend")) and any(
                isinstance(a, ResourceScope) and a.covers(scope) for a in allowed_parsed)
        if fits:
            granted.append(text)
    return granted


def narrows(requested: str, original: str) -> bool:
    """True when every scope of ``requested`` is covered by one of ``original`` (refresh)."""
    original_parsed = parse_scopes(original.split(), strict=False)
    for text in requested.split():
        try:
            scope = parse_scope(text)
        except ScopeError:
            return False
        if isinstance(scope, str):
            if scope not in original_parsed:
                return False
        elif not any(isinstance(o, ResourceScope) and o.covers(scope) for o in original_parsed):
            return False
    return True


@lru_cache(maxsize=4096)
def _grants(scopes: frozenset[str], has_patient: bool) -> tuple[ResourceScope, ...]:
    """The resource scopes of a token; patient/ scopes only with a patient in context."""
    return tuple(s for s in parse_scopes(sorted(scopes), strict=False)
                 if isinstance(s, ResourceScope) and (s.context != "patient" or has_patient))


def resource_grants(ctx: AccessContext) -> tuple[ResourceScope, ...]:
    return _grants(ctx.scopes, ctx.patient is not None)


def _patient_id(ctx: AccessContext) -> str:
    assert ctx.patient is not None
    return ctx.patient.rsplit("/", 1)[-1]


class ScopePolicy:
    """The ``authorize`` half of the access policy (plus what scopes imply for rows)."""

    def authorize(self, ctx: AccessContext, interaction: str, resource_type: str) -> None:
        needed = INTERACTION_PERMISSIONS.get(interaction)
        if needed is None:
            raise Forbidden(f"the interaction '{interaction}' is not covered by any SMART scope")
        grants = resource_grants(ctx)
        for letter in needed:
            if not any(g.applies_to(resource_type) and letter in g.permissions for g in grants):
                example = f"{_example_context(ctx)}/{resource_type}.{letter}"
                raise Forbidden(f"the access token's scopes do not allow {interaction} on {resource_type} "
                                f"(a scope such as {example} is needed)")

    def visibility_key(self, ctx: AccessContext) -> Hashable | None:
        """What :meth:`visible` depends on: the caller's scopes and its patient context."""
        return ("scopes", ctx.scopes, ctx.patient)  # a frozenset: equal whatever the order

    def visible(self, ctx: AccessContext, resource_type: str, type_col: sa.ColumnElement,
                id_col: sa.ColumnElement) -> sa.ColumnElement | None:
        readers = [g for g in resource_grants(ctx) if g.permissions & {"r", "s"}
                   and (resource_type == "*" or g.applies_to(resource_type))]
        clauses: list[sa.ColumnElement] = []
        for grant in readers:
            if resource_type == "*" and grant.resource_type != "*":
                clause = _grant_clause(ctx, grant, grant.resource_type, type_col, id_col)
                clauses.append(sa.and_(type_col == grant.resource_type, sa.true() if clause is None else clause))
                continue
            clause = _grant_clause(ctx, grant, resource_type, type_col, id_col)
            if clause is None:
                return None  # one unrestricted grant: nothing to add
            clauses.append(clause)
        return sa.or_(*clauses) if clauses else sa.false()

    def check_write(self, ctx: AccessContext, resource_type: str, resource: dict[str, Any] | None,
                    previous: dict[str, Any] | None) -> None:
        letters = "d" if resource is None else ("u" if previous is not None else "cu")
        candidates = [g for g in resource_grants(ctx) if g.applies_to(resource_type) and g.permissions & set(letters)]
        for grant in candidates:
            if all(_content_allowed(ctx, grant, resource_type, content)
                   for content in (resource, previous) if content is not None):
                return
        raise Forbidden(f"the access token's scopes do not allow this change to {resource_type}: the resource "
                        "(before or after the change) lies outside the scope's restriction or patient")


def _example_context(ctx: AccessContext) -> str:
    if ctx.patient is not None:
        return "patient"
    return "user" if ctx.user else "system"


def _grant_clause(ctx: AccessContext, grant: ResourceScope, resource_type: str, type_col: sa.ColumnElement,
                  id_col: sa.ColumnElement) -> sa.ColumnElement | None:
    """The rows ``grant`` shows of ``resource_type`` ("*": any type), or None for all."""
    parts = [r.clause(resource_type, id_col) for r in grant.restrictions]
    if grant.context == "patient":
        parts.append(_compartment_clause(_patient_id(ctx), resource_type, type_col, id_col))
    return sa.and_(*parts) if parts else None


def _compartment_clause(patient_id: str, resource_type: str, type_col: sa.ColumnElement,
                        id_col: sa.ColumnElement) -> sa.ColumnElement:
    if resource_type == "Patient":
        return id_col == patient_id
    ref = REF.alias()
    if resource_type == "*":
        in_compartment = sa.exists().where(ref.c.resource_type == type_col, ref.c.resource_id == id_col,
                                           ref.c.param.in_(_COMPARTMENT_PARAMS), ref.c.target_type == "Patient",
                                           ref.c.target_id == patient_id)
        return sa.or_(sa.and_(type_col == "Patient", id_col == patient_id),
                      sa.and_(type_col.in_(sorted(PATIENT_COMPARTMENT)), in_compartment),
                      type_col.in_(sorted(DIRECTORY_TYPES)))
    if resource_type in DIRECTORY_TYPES:
        return sa.true()
    params = PATIENT_COMPARTMENT.get(resource_type)
    if not params:
        return sa.false()
    return sa.exists().where(ref.c.resource_type == resource_type, ref.c.resource_id == id_col,
                             ref.c.param.in_(params), ref.c.target_type == "Patient", ref.c.target_id == patient_id)


def _content_allowed(ctx: AccessContext, grant: ResourceScope, resource_type: str, content: dict[str, Any]) -> bool:
    """Does one version of a resource lie inside the grant's restriction and patient?"""
    if not grant.restrictions and grant.context != "patient":
        return True
    from service.fhir.indexing import index_resource

    rows = index_resource(content)
    if not all(r.matches(rows.tokens) for r in grant.restrictions):
        return False
    if grant.context != "patient":
        return True
    patient_id = _patient_id(ctx)
    if resource_type == "Patient":
        return content.get("id") == patient_id
    if resource_type in DIRECTORY_TYPES:
        return True
    params = PATIENT_COMPARTMENT.get(resource_type, ())
    return any(ref["param"] in params and ref["target_type"] == "Patient" and ref["target_id"] == patient_id
               for ref in rows.references)
