"""Organization boundaries: who may see and change which resources (issue #4, PIPL Art. 28).

Nobody sees what their organization and role do not need. :class:`BoundaryPolicy` is the
``visible`` / ``check_write`` half of the store's :class:`~service.fhir.hooks.AccessPolicy`
(SMART scopes, ``authorize``, live in ``service.security.scopes.ScopePolicy``). Visibility is
one SQL clause over the index tables — never JSON — so reads, searches, totals, ``_include`` /
``_revinclude``, chains, ``_has``, history and conditional matching all obey the same rule; what
is not visible answers 404. Writes are checked by the same clauses against the database inside
the write's transaction (:meth:`BoundaryPolicy.install_hooks`); what is refused answers 403.

The rules (README "Privacy and audit" has the table)
----------------------------------------------------
*S* is the caller's organization and every organization below it through ``partOf`` (a
hospital and its departments; an alliance and all its members), resolved by the database in the
same statement (a recursive query over ``idx_reference`` ``Organization.partof``).

* An *agent of S* is a reference to an Organization in S, or to a PractitionerRole,
  HealthcareService or Location whose ``organization`` is in S. (A bare Practitioner reference
  names no organization — many doctors practise at several, 多点执业 — so it places nothing.)
* A *referral* (ServiceRequest, Task, Appointment) is S's when an agent of S is its requester,
  or — once it is sent, not while ``draft`` — its performer, owner or actor; or (Task
  ``focus``/``based-on``, Appointment ``based-on``) it belongs to a ServiceRequest that is S's.
  It is *active* while sent and not final (not draft, completed, revoked, cancelled ...).
* A resident is *contracted* with S (R1, R50) when the Patient's ``managingOrganization`` or
  ``generalPractitioner`` is an agent of S, or an active CarePlan of category
  ``family-doctor-contract`` for the patient has an agent of S as ``performer`` (or ``author``,
  once a SearchParameter for CarePlan.author is installed).
* A patient is *visible* to S when contracted with S or the subject of one of S's referrals
  (any status: a hospital keeps seeing the patients it was referred).
* S is *treating* a patient when contracted, or S has an *active* referral for them. The
  alliance desk (an Organization typed ``alliance``) treats nobody itself.
* *Sharing refused*: a Consent with ``scope`` patient-privacy and ``status`` rejected or
  inactive for the patient. Records are then shared with treating organizations only (R50).
* A *record* (every type of the FHIR Patient compartment that is not listed elsewhere:
  Condition, Observation, DiagnosticReport, MedicationRequest, Encounter, AllergyIntolerance,
  Procedure, CarePlan, Immunization, Consent, Coverage, ...) is visible when one of its patient
  compartment references is a visible patient, and sharing is not refused or S is treating.
* Referral attachments: a DocumentReference is also visible when its ``context.related`` points
  at a visible referral or a visible referral references it; a Binary or a stored Bundle when a
  visible referral references it or a visible DocumentReference's ``content.attachment.url``
  is ``Binary/<id>`` / ``Bundle/<id>``.
* Directory data (Organization, Location, HealthcareService, Practitioner, PractitionerRole,
  Endpoint, Slot, Medication, terminology and knowledge artifacts ...; Schedule, CareTeam,
  Group, Device, List while they name no patient) is visible to every authenticated caller:
  it holds no health data, and cross-alliance referral needs the directory. It is *written*
  only by its owner (the organization it belongs to, through the same agent rule) or, for
  terminology and knowledge artifacts, by an alliance desk.
* AuditEvent and Provenance are visible only to auditors (a ``user/`` or ``system/`` scope on
  ``AuditEvent`` itself that reads — wildcards do not count) and then only events whose agent
  is an agent of S; restricted callers never write them (the server does), and nobody updates
  or deletes them (a hook refuses it even to internal callers).
* A patient-context app (``ctx.patient``) sees that Patient, the records and referrals in its
  compartment, their attachments, and directory data; it writes only inside its compartment.
  With both an organization and a patient, both rules apply.
* Internal callers (``ctx.system``) are not restricted (the store skips the policy); with
  ``YILIAN_AUTH=off`` neither are callers without organization and patient (development),
  except that audit records stay out of their system-wide ``_history``. With authentication
  on, a caller with neither sees directory data only and writes nothing.
* Every other resource type is visible to unrestricted callers only.

Writes: the caller must be able to write the current version (update, patch, delete), must
be able to see every resource the new content references (so nobody gains access by pointing
a referral at someone else's patient or document), and must be able to write the result (so
nobody creates data outside their boundary) — the last checked once per transaction, just
before COMMIT, on its final state. Binary and Bundle may be created before the
DocumentReference or referral that links them.
"""

from __future__ import annotations

import re
import weakref
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles

from service.config import Settings, get_settings
from service.fhir import tables
from service.fhir.access import AccessContext
from service.fhir.errors import Forbidden
from service.fhir.hooks import ANY_TYPE, WriteEvent, WriteHooks
from service.fhir.indexing.values import reference_row
from service.fhir.statements import Prepared, StatementCache

REF: sa.Table = tables.ReferenceIndex.__table__  # type: ignore[attr-defined]
TOKEN: sa.Table = tables.TokenIndex.__table__  # type: ignore[attr-defined]
URI: sa.Table = tables.UriIndex.__table__  # type: ignore[attr-defined]
RESOURCE: sa.Table = tables.ResourceRow.__table__  # type: ignore[attr-defined]
#: The resource a visibility clause is about; the store's columns are tied to it by primary key.
TARGET = RESOURCE.alias("vis_target")

Expr = sa.ColumnElement[Any] | str  # a resource type or id: a literal, or a column to correlate with

AUDIT_TYPES = frozenset({"AuditEvent", "Provenance"})
REFERRAL_TYPES = ("ServiceRequest", "Task", "Appointment")
#: Reference parameters naming who takes part in a referral (each type has its own subset):
#: the sender, and the receivers, who take part only once it is sent (not while ``draft``).
PARTICIPANT_PARAMS = ("requester", "performer", "owner", "actor")
#: Parameters of a referral that name its patient (with target type Patient).
REFERRAL_PATIENT_PARAMS = ("subject", "patient", "actor")
#: A Task or Appointment belongs to the ServiceRequest it is about.
REFERRAL_LINK_PARAMS = ("focus", "based-on")
#: Statuses of a referral still in progress (ServiceRequest, Task and Appointment codes).
ACTIVE_REFERRAL_STATUSES = ("active", "on-hold", "requested", "received", "accepted", "ready",
                            "in-progress", "proposed", "pending", "booked", "arrived", "checked-in", "waitlist")
#: Entities that belong to an organization through their ``organization`` parameter.
ORG_BOUND_TYPES = ("PractitionerRole", "HealthcareService", "Location")
#: CarePlan.category code of a family-doctor contract (R1), and who signs for the clinic.
CONTRACT_CATEGORY_CODES = ("family-doctor-contract",)
CONTRACT_PARTY_PARAMS = ("performer", "author")
#: Consent that withdraws record sharing (R50).
REFUSING_CONSENT_STATUSES = ("rejected", "inactive")
PRIVACY_CONSENT_SCOPES = ("patient-privacy",)
#: Organization.type code of a medical alliance (the alliance desk acts for it).
ALLIANCE_TYPE_CODE = "alliance"
#: How deep ``partOf`` is followed below the caller's organization (alliance → hospital →
#: department → ward → team); deeper trees are cut off, cycles are harmless.
MAX_ORG_DEPTH = 6

#: The FHIR R4 Patient compartment (CompartmentDefinition-patient): the parameters through
#: which a resource of each type belongs to a patient.
PATIENT_COMPARTMENT: dict[str, tuple[str, ...]] = {
    "Account": ("subject",), "AdverseEvent": ("subject",),
    "AllergyIntolerance": ("patient", "recorder", "asserter"), "Appointment": ("actor",),
    "AppointmentResponse": ("actor",), "AuditEvent": ("patient",), "Basic": ("patient", "author"),
    "BodyStructure": ("patient",), "CarePlan": ("patient", "performer"),
    "CareTeam": ("patient", "participant"), "ChargeItem": ("subject",), "Claim": ("patient", "payee"),
    "ClaimResponse": ("patient",), "ClinicalImpression": ("subject",),
    "Communication": ("subject", "sender", "recipient"),
    "CommunicationRequest": ("subject", "sender", "recipient", "requester"),
    "Composition": ("subject", "author", "attester"), "Condition": ("patient", "asserter"),
    "Consent": ("patient",), "Coverage": ("policy-holder", "subscriber", "beneficiary", "payor"),
    "CoverageEligibilityRequest": ("patient",), "CoverageEligibilityResponse": ("patient",),
    "DetectedIssue": ("patient",), "DeviceRequest": ("subject", "performer"),
    "DeviceUseStatement": ("subject",), "DiagnosticReport": ("subject",),
    "DocumentManifest": ("subject", "author", "recipient"), "DocumentReference": ("subject", "author"),
    "Encounter": ("patient",), "EnrollmentRequest": ("subject",), "EpisodeOfCare": ("patient",),
    "ExplanationOfBenefit": ("patient", "payee"), "FamilyMemberHistory": ("patient",), "Flag": ("patient",),
    "Goal": ("patient",), "Group": ("member",), "ImagingStudy": ("patient",), "Immunization": ("patient",),
    "ImmunizationEvaluation": ("patient",), "ImmunizationRecommendation": ("patient",),
    "Invoice": ("subject", "patient", "recipient"), "List": ("subject", "source"),
    "MeasureReport": ("patient",), "Media": ("subject",),
    "MedicationAdministration": ("patient", "performer", "subject"),
    "MedicationDispense": ("subject", "patient", "receiver"), "MedicationRequest": ("subject",),
    "MedicationStatement": ("subject",), "MolecularSequence": ("patient",), "NutritionOrder": ("patient",),
    "Observation": ("subject", "performer"), "Patient": ("link",), "Person": ("patient",),
    "Procedure": ("patient", "performer"), "Provenance": ("patient",),
    "QuestionnaireResponse": ("subject", "author"), "RelatedPerson": ("patient",),
    "RequestGroup": ("subject", "participant"), "ResearchSubject": ("individual",),
    "RiskAssessment": ("subject",), "Schedule": ("actor",), "ServiceRequest": ("subject", "performer"),
    "Specimen": ("subject",), "SupplyDelivery": ("patient",), "SupplyRequest": ("subject",),
    "VisionPrescription": ("patient",),
}

#: Directory, terminology and knowledge resources: no health data of anyone.
REFERENCE_TYPES = frozenset({
    "Organization", "Location", "HealthcareService", "Practitioner", "PractitionerRole", "Endpoint", "Slot",
    "OrganizationAffiliation", "InsurancePlan", "Medication", "MedicationKnowledge", "Substance",
    "SubstanceSpecification", "DeviceDefinition", "DeviceMetric", "MedicinalProduct",
    "MedicinalProductAuthorization", "MedicinalProductContraindication", "MedicinalProductIndication",
    "MedicinalProductInteraction", "MedicinalProductPackaged", "MedicinalProductPharmaceutical",
    "MedicinalProductUndesirableEffect", "CodeSystem", "ValueSet", "ConceptMap", "NamingSystem",
    "TerminologyCapabilities", "StructureDefinition", "StructureMap", "SearchParameter", "OperationDefinition",
    "CapabilityStatement", "CompartmentDefinition", "ImplementationGuide", "GraphDefinition",
    "MessageDefinition", "ExampleScenario", "Questionnaire", "PlanDefinition", "ActivityDefinition", "Library",
    "Measure", "EventDefinition", "Evidence", "EvidenceVariable", "EffectEvidenceSynthesis",
    "RiskEvidenceSynthesis", "ResearchDefinition", "ResearchElementDefinition", "ObservationDefinition",
    "SpecimenDefinition", "ChargeItemDefinition",
})
#: Directory data while they name no patient; records once they do.
MIXED_TYPES: dict[str, tuple[str, ...]] = {
    "Schedule": ("actor",), "CareTeam": ("patient", "subject", "participant"), "Group": ("member",),
    "Device": ("patient",), "List": ("subject", "source"),
}
#: Who owns directory data, for writes: the parameter naming its organization (an agent of S).
OWNER_PARAMS: dict[str, str] = {
    "Location": "organization", "HealthcareService": "organization", "PractitionerRole": "organization",
    "Endpoint": "organization", "Device": "organization", "Group": "managing-entity",
    "CareTeam": "participant", "Schedule": "actor",
}
#: Records that also belong to referrals through these parameters.
REFERRAL_LINKED: dict[str, tuple[str, ...]] = {
    "DocumentReference": ("related",), "AppointmentResponse": ("appointment",),
    "Communication": ("based-on", "part-of"),
}
#: Stored content that only its links make visible.
CONTENT_TYPES = ("Binary", "Bundle")
_SPECIAL = AUDIT_TYPES | {"Patient", *REFERRAL_TYPES, *CONTENT_TYPES} | MIXED_TYPES.keys() | REFERENCE_TYPES
#: Records: the patient compartment minus the types with rules of their own, plus Contract.
RECORD_PARAMS: dict[str, tuple[str, ...]] = {
    **{t: p for t, p in PATIENT_COMPARTMENT.items() if t not in _SPECIAL},
    "Contract": ("patient", "subject", "signer"),
}

_AUDITOR_SCOPE = re.compile(r"^(user|system)/AuditEvent\.(read|\*|c?r[uds]*|c?u?d?s)$")


def is_auditor(ctx: AccessContext) -> bool:
    """An auditor holds a scope that reads AuditEvent by name (``system/AuditEvent.rs``,
    ``user/AuditEvent.read`` ...); ``*`` scopes do not make anyone an auditor."""
    return ctx.system or any(_AUDITOR_SCOPE.match(scope) for scope in ctx.scopes)


_FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


def _local_id(reference: str | None, resource_type: str) -> str | None:
    """The id of a ``Type/id`` reference of the given type (None when it is not one)."""
    if not reference:
        return None
    kind, _, rid = reference.rpartition("/")
    if kind.rpartition("/")[2] != resource_type or not _FHIR_ID.match(rid):
        return None
    return rid


def _exists(table: sa.FromClause, *conditions: sa.ColumnElement[bool]) -> sa.ColumnElement[bool]:
    """EXISTS over ``table`` whose other columns belong to the enclosing queries, at whatever
    depth. (SQLAlchemy's automatic correlation looks one level up only: a test on the row two
    levels up became a cross join with a second copy of its table, true for every row.)"""
    return sa.exists().where(*conditions).correlate_except(table)


def _token(type_expr: Expr, id_expr: Expr, param: str, codes: tuple[str, ...]) -> sa.ColumnElement[bool]:
    t = TOKEN.alias()
    return _exists(t, t.c.resource_type == type_expr, t.c.resource_id == id_expr, t.c.param == param,
                   t.c.code.in_(codes))


def _patient_link(type_expr: Expr, id_expr: Expr, params: tuple[str, ...]) -> sa.ColumnElement[bool]:
    r = REF.alias()
    return _exists(r, r.c.resource_type == type_expr, r.c.resource_id == id_expr, r.c.param.in_(params),
                   r.c.target_type == "Patient")


def _sharing_refused(pid: Expr) -> sa.ColumnElement[bool]:
    c = REF.alias()
    return _exists(
        c, c.c.resource_type == "Consent", c.c.param == "patient", c.c.target_type == "Patient", c.c.target_id == pid,
        _token("Consent", c.c.resource_id, "status", REFUSING_CONSENT_STATUSES),
        _token("Consent", c.c.resource_id, "scope", PRIVACY_CONSENT_SCOPES))


class _Rules:
    """The rules for one caller as correlated SQL. Subclasses give the primitives (which
    patients, records and referrals); the composites here are shared."""

    def __init__(self, *, auditor: bool, base_url: str) -> None:
        self.auditor = auditor
        self.base_url = base_url.rstrip("/") + "/" if base_url else ""
        self._built: dict[tuple[str, bool], sa.ColumnElement[bool]] = {}

    def identity(self) -> tuple[Any, ...]:
        """Everything the built clauses depend on (their SQL and their bound values)."""
        return (type(self).__name__, self.auditor, self.base_url)

    def on_target(self, resource_type: str, *, write: bool) -> sa.ColumnElement[bool]:
        """The rule for ``resource_type`` over the row :data:`TARGET`, built once and reused:
        building these clauses costs far more than running them."""
        key = (resource_type, write)
        built = self._built.get(key)
        if built is None:
            if resource_type == "*":
                built = self.any_type(TARGET.c.resource_type, TARGET.c.id)
            else:
                built = self.rule(resource_type, resource_type, TARGET.c.id, write=write)
            built = _Memoized(built, (*self.identity(), resource_type, write))
            self._built[key] = built
        return built

    # -- primitives ------------------------------------------------------------------------
    def patient(self, pid: Expr) -> sa.ColumnElement[bool]:
        return sa.false()

    def record_patient(self, pid: Expr) -> sa.ColumnElement[bool]:
        return sa.false()

    def referral(self, type_expr: Expr, id_expr: Expr) -> sa.ColumnElement[bool]:
        return sa.false()

    def owned(self, resource_type: str, type_expr: Expr, id_expr: Expr) -> sa.ColumnElement[bool]:
        return sa.false()

    def audit(self, type_expr: Expr, id_expr: Expr) -> sa.ColumnElement[bool]:
        return sa.false()

    # -- composites ------------------------------------------------------------------------
    def record(self, type_expr: Expr, id_expr: Expr, params: tuple[str, ...]) -> sa.ColumnElement[bool]:
        r = REF.alias()
        return _exists(r, r.c.resource_type == type_expr, r.c.resource_id == id_expr, r.c.param.in_(params),
                                 r.c.target_type == "Patient", self.record_patient(r.c.target_id))

    def linked_to_referral(self, type_expr: Expr, id_expr: Expr, params: tuple[str, ...]) -> sa.ColumnElement[bool]:
        d = REF.alias()
        return _exists(d, d.c.resource_type == type_expr, d.c.resource_id == id_expr, d.c.param.in_(params),
                                 d.c.target_type.in_(REFERRAL_TYPES), self.referral(d.c.target_type, d.c.target_id))

    def referenced_by_referral(self, type_expr: Expr, id_expr: Expr) -> sa.ColumnElement[bool]:
        b = REF.alias()
        return _exists(b, b.c.target_type == type_expr, b.c.target_id == id_expr,
                                 b.c.resource_type.in_(REFERRAL_TYPES),
                                 self.referral(b.c.resource_type, b.c.resource_id))

    def document(self, id_expr: Expr) -> sa.ColumnElement[bool]:
        return sa.or_(self.record("DocumentReference", id_expr, PATIENT_COMPARTMENT["DocumentReference"]),
                      self.linked_to_referral("DocumentReference", id_expr, REFERRAL_LINKED["DocumentReference"]),
                      self.referenced_by_referral("DocumentReference", id_expr))

    def content(self, type_expr: Expr, id_expr: Expr) -> sa.ColumnElement[bool]:
        """A Binary / Bundle: referenced by a visible referral, or the attachment of a visible
        DocumentReference (``content.attachment.url`` relative or under our base URL)."""
        return sa.or_(self.referenced_by_referral(type_expr, id_expr), self.attached(type_expr, id_expr))

    def attached(self, type_expr: Expr, id_expr: Expr) -> sa.ColumnElement[bool]:
        u = URI.alias()
        kind = sa.literal(type_expr) if isinstance(type_expr, str) else type_expr
        relative = kind.concat("/").concat(id_expr)
        urls = [relative] + ([sa.literal(self.base_url).concat(relative)] if self.base_url else [])
        return _exists(u, u.c.resource_type == "DocumentReference", u.c.param == "location",
                                 u.c.value.in_(urls), self.document(u.c.resource_id))

    def rule(self, resource_type: str, type_expr: Expr, id_expr: Expr, *, write: bool) -> sa.ColumnElement[bool]:
        """What the caller may see (``write``: change) of ``resource_type``."""
        if resource_type in AUDIT_TYPES:
            return sa.false() if write else self.audit(type_expr, id_expr)
        if resource_type == "Patient":
            return self.patient(id_expr)
        if resource_type in REFERRAL_TYPES:
            return self.referral(type_expr, id_expr)
        if resource_type == "DocumentReference":
            return self.document(id_expr)
        if resource_type in CONTENT_TYPES:
            return self.content(type_expr, id_expr)
        if resource_type in REFERENCE_TYPES:
            return self.owned(resource_type, type_expr, id_expr) if write else sa.true()
        if resource_type in MIXED_TYPES:
            params = MIXED_TYPES[resource_type]
            directory = self.owned(resource_type, type_expr, id_expr) if write else sa.true()
            return sa.or_(self.record(type_expr, id_expr, params),
                          sa.and_(~_patient_link(type_expr, id_expr, params), directory))
        if resource_type in RECORD_PARAMS:
            clause = self.record(type_expr, id_expr, RECORD_PARAMS[resource_type])
            if resource_type in REFERRAL_LINKED:
                clause = sa.or_(clause, self.linked_to_referral(type_expr, id_expr, REFERRAL_LINKED[resource_type]))
            return clause
        return sa.false()

    def any_type(self, type_col: sa.ColumnElement[Any], id_col: sa.ColumnElement[Any]) -> sa.ColumnElement[bool]:
        """The same rules when the type varies from row to row (system-wide history), written
        with (type, parameter) pairs so that each composite appears once in the statement."""
        record_params = {**RECORD_PARAMS, **MIXED_TYPES, "DocumentReference": PATIENT_COMPARTMENT["DocumentReference"]}
        r, d, mixed = REF.alias(), REF.alias(), REF.alias()
        record = _exists(r,
            r.c.resource_type == type_col, r.c.resource_id == id_col, r.c.target_type == "Patient",
            sa.tuple_(r.c.resource_type, r.c.param).in_(_pairs(record_params)), self.record_patient(r.c.target_id))
        linked = _exists(d,
            d.c.resource_type == type_col, d.c.resource_id == id_col, d.c.target_type.in_(REFERRAL_TYPES),
            sa.tuple_(d.c.resource_type, d.c.param).in_(_pairs(REFERRAL_LINKED)),
            self.referral(d.c.target_type, d.c.target_id))
        names_patient = _exists(mixed,
            mixed.c.resource_type == type_col, mixed.c.resource_id == id_col, mixed.c.target_type == "Patient",
            sa.tuple_(mixed.c.resource_type, mixed.c.param).in_(_pairs(MIXED_TYPES)))
        return sa.or_(
            type_col.in_(sorted(REFERENCE_TYPES)),
            sa.and_(type_col.in_(sorted(MIXED_TYPES)), ~names_patient),
            sa.and_(type_col.in_(sorted(AUDIT_TYPES)), self.audit(type_col, id_col)),
            sa.and_(type_col == "Patient", self.patient(id_col)),
            sa.and_(type_col.in_(REFERRAL_TYPES), self.referral(type_col, id_col)),
            sa.and_(type_col.in_(sorted(record_params)), record),
            sa.and_(type_col.in_(sorted(REFERRAL_LINKED)), linked),
            sa.and_(type_col.in_(("DocumentReference", *CONTENT_TYPES)), self.referenced_by_referral(type_col, id_col)),
            sa.and_(type_col.in_(CONTENT_TYPES), self.attached(type_col, id_col)),
        )


def _pairs(params_by_type: dict[str, tuple[str, ...]]) -> list[tuple[str, str]]:
    return sorted({(t, p) for t, params in params_by_type.items() for p in params})


class _NobodyRules(_Rules):
    """Authenticated but acting for no organization and no patient: directory data only."""


class _PatientRules(_Rules):
    """A patient-context app: one patient's compartment."""

    def __init__(self, patient_id: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pid = patient_id

    def identity(self) -> tuple[Any, ...]:
        return (*super().identity(), self.pid)

    def patient(self, pid: Expr) -> sa.ColumnElement[bool]:
        return sa.literal(self.pid) == pid if isinstance(pid, str) else pid == self.pid

    record_patient = patient

    def referral(self, type_expr: Expr, id_expr: Expr) -> sa.ColumnElement[bool]:
        x = REF.alias()
        return _exists(x, x.c.resource_type == type_expr, x.c.resource_id == id_expr,
                                 x.c.param.in_(REFERRAL_PATIENT_PARAMS), x.c.target_type == "Patient",
                                 x.c.target_id == self.pid)


class _OrganizationRules(_Rules):
    """An organization and everything below it (see the module docstring)."""

    def __init__(self, organization_id: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.org_id = organization_id
        # The subtree, as one recursive query the database evaluates once per statement:
        # the organization itself if it exists, then whatever is partOf something already in.
        anchor = sa.select(RESOURCE.c.id.label("id"), sa.literal_column("0").label("depth")).where(
            RESOURCE.c.resource_type == "Organization", RESOURCE.c.id == organization_id)
        tree = anchor.cte("org_subtree", recursive=True)
        child = REF.alias("org_child")
        self._tree = tree.union(
            sa.select(child.c.resource_id, tree.c.depth + sa.literal_column("1")).where(
                child.c.resource_type == "Organization", child.c.param == "partof",
                child.c.target_type == "Organization", child.c.target_id == tree.c.id, tree.c.depth < MAX_ORG_DEPTH))
        alliance = TOKEN.alias("desk_type")
        self._not_desk = ~_exists(alliance, alliance.c.resource_type == "Organization",
                                            alliance.c.resource_id == organization_id, alliance.c.param == "type",
                                            alliance.c.code == ALLIANCE_TYPE_CODE)

    def identity(self) -> tuple[Any, ...]:
        return (*super().identity(), self.org_id)

    def in_tree(self, column: sa.ColumnElement[Any]) -> sa.ColumnElement[bool]:
        return column.in_(sa.select(self._tree.c.id))

    def _with_agent(self, ref: sa.FromClause, source: sa.FromClause | None = None
                    ) -> tuple[sa.FromClause, sa.ColumnElement[bool]]:
        """``source`` (default ``ref``) joined with what ``ref``'s target belongs to, and the
        condition that ``ref`` points at an agent of S. Joins rather than nested EXISTS keep
        the statements shallow (SQLite's parser has a depth limit)."""
        o = REF.alias()
        joined = (source if source is not None else ref).outerjoin(o, sa.and_(
            o.c.resource_type == ref.c.target_type, o.c.resource_id == ref.c.target_id,
            o.c.param == "organization", o.c.target_type == "Organization"))
        condition = sa.or_(sa.and_(ref.c.target_type == "Organization", self.in_tree(ref.c.target_id)),
                           sa.and_(ref.c.target_type.in_(ORG_BOUND_TYPES), self.in_tree(o.c.target_id)))
        return joined, condition

    def _agent_exists(self, ref: sa.FromClause, *conditions: sa.ColumnElement[bool],
                      source: sa.FromClause | None = None) -> sa.ColumnElement[bool]:
        joined, agent = self._with_agent(ref, source)
        return sa.select(sa.literal(1)).select_from(joined).where(*conditions, agent).correlate_except(joined).exists()

    def contracted(self, pid: Expr) -> sa.ColumnElement[bool]:
        m = REF.alias()
        managed = self._agent_exists(m, m.c.resource_type == "Patient", m.c.resource_id == pid,
                                     m.c.param.in_(("organization", "general-practitioner")))
        c, a = REF.alias(), REF.alias()
        # the token tests are correlated EXISTS so that the plan starts from the patient's own
        # CarePlans, never from every contract of the database
        contract = self._agent_exists(
            a, c.c.resource_type == "CarePlan", c.c.param == "patient", c.c.target_type == "Patient",
            c.c.target_id == pid,
            _token("CarePlan", c.c.resource_id, "category", CONTRACT_CATEGORY_CODES),
            _token("CarePlan", c.c.resource_id, "status", ("active",)),
            source=c.join(a, sa.and_(a.c.resource_type == "CarePlan", a.c.resource_id == c.c.resource_id,
                                     a.c.param.in_(CONTRACT_PARTY_PARAMS))))
        return sa.or_(managed, contract)

    def _participation(self, row: sa.FromClause, type_expr: Expr, id_expr: Expr, *conditions: sa.ColumnElement[bool],
                       status: tuple[str, ...] | None = None) -> sa.ColumnElement[bool]:
        """Referrals (``type_expr``/``id_expr``, columns of ``row`` or literals) that are S's:
        an agent of S takes part directly, or through the ServiceRequest they belong to."""
        base: sa.FromClause = row
        if status is not None:  # a correlated test, never the table the plan starts from
            conditions = (*conditions, _token(type_expr, id_expr, "status", status))
        p = REF.alias()
        took_part = base.join(p, sa.and_(p.c.resource_type == type_expr, p.c.resource_id == id_expr,
                                         p.c.param.in_(PARTICIPANT_PARAMS)))
        direct = self._agent_exists(p, *conditions, self._taking_part(p, type_expr, id_expr), source=took_part)
        link, q = REF.alias(), REF.alias()
        through_request = base.join(link, sa.and_(
            link.c.resource_type == type_expr, link.c.resource_id == id_expr, link.c.param.in_(REFERRAL_LINK_PARAMS),
            link.c.target_type == "ServiceRequest")).join(q, sa.and_(
                q.c.resource_type == "ServiceRequest", q.c.resource_id == link.c.target_id,
                q.c.param.in_(PARTICIPANT_PARAMS)))
        via_request = self._agent_exists(q, *conditions, self._taking_part(q, "ServiceRequest", q.c.resource_id),
                                         source=through_request)
        return sa.or_(direct, via_request)

    @staticmethod
    def _taking_part(p: sa.FromClause, type_expr: Expr, id_expr: Expr) -> sa.ColumnElement[bool]:
        """The sender always; a receiver once the referral is sent (a draft is the sender's)."""
        return sa.or_(p.c.param == "requester", ~_token(type_expr, id_expr, "status", ("draft",)))

    def participant(self, type_expr: Expr, id_expr: Expr) -> sa.ColumnElement[bool]:
        p, link, q = REF.alias(), REF.alias(), REF.alias()
        direct = self._agent_exists(p, p.c.resource_type == type_expr, p.c.resource_id == id_expr,
                                    p.c.param.in_(PARTICIPANT_PARAMS), self._taking_part(p, type_expr, id_expr))
        via_request = self._agent_exists(q, link.c.resource_type == type_expr, link.c.resource_id == id_expr,
                                         link.c.param.in_(REFERRAL_LINK_PARAMS),
                                         link.c.target_type == "ServiceRequest",
                                         self._taking_part(q, "ServiceRequest", q.c.resource_id),
                                         source=link.join(q, sa.and_(
                                             q.c.resource_type == "ServiceRequest", q.c.resource_id == link.c.target_id,
                                             q.c.param.in_(PARTICIPANT_PARAMS))))
        return sa.or_(direct, via_request)

    def in_referral(self, pid: Expr, *, active: bool) -> sa.ColumnElement[bool]:
        """The patient is the subject of one of S's referrals (``active``: still in progress)."""
        x = REF.alias()
        return self._participation(
            x, x.c.resource_type, x.c.resource_id, x.c.resource_type.in_(REFERRAL_TYPES),
            x.c.param.in_(REFERRAL_PATIENT_PARAMS), x.c.target_type == "Patient", x.c.target_id == pid,
            status=ACTIVE_REFERRAL_STATUSES if active else None)

    def patient(self, pid: Expr) -> sa.ColumnElement[bool]:
        return sa.or_(self.contracted(pid), self.in_referral(pid, active=False))

    def record_patient(self, pid: Expr) -> sa.ColumnElement[bool]:
        # treating (contracted, or an active referral of S; never the desk itself), or visible
        # and the patient has not refused sharing (R50)
        refused = _sharing_refused(pid)
        return sa.or_(sa.and_(self.contracted(pid), sa.or_(self._not_desk, ~refused)),
                      sa.and_(self._not_desk, self.in_referral(pid, active=True)),
                      sa.and_(~refused, self.in_referral(pid, active=False)))

    def referral(self, type_expr: Expr, id_expr: Expr) -> sa.ColumnElement[bool]:
        y, m = REF.alias(), REF.alias()
        # the family doctor sees the referrals of the residents it manages (R41, R50)
        of_managed = self._agent_exists(m, y.c.resource_type == type_expr, y.c.resource_id == id_expr,
                                        y.c.param.in_(REFERRAL_PATIENT_PARAMS), y.c.target_type == "Patient",
                                        source=y.join(m, sa.and_(
                                            m.c.resource_type == "Patient", m.c.resource_id == y.c.target_id,
                                            m.c.param.in_(("organization", "general-practitioner")))))
        return sa.or_(self.participant(type_expr, id_expr), of_managed)

    def owned(self, resource_type: str, type_expr: Expr, id_expr: Expr) -> sa.ColumnElement[bool]:
        if resource_type == "Organization":
            return self.in_tree(id_expr if not isinstance(id_expr, str) else sa.literal(id_expr))
        if resource_type in OWNER_PARAMS:
            o = REF.alias()
            return self._agent_exists(o, o.c.resource_type == type_expr, o.c.resource_id == id_expr,
                                      o.c.param == OWNER_PARAMS[resource_type])
        if resource_type == "Slot":
            slot, a = REF.alias(), REF.alias()
            return self._agent_exists(a, slot.c.resource_type == "Slot", slot.c.resource_id == id_expr,
                                      slot.c.param == "schedule", slot.c.target_type == "Schedule",
                                      source=slot.join(a, sa.and_(a.c.resource_type == "Schedule",
                                                                  a.c.resource_id == slot.c.target_id,
                                                                  a.c.param == "actor")))
        if resource_type == "Practitioner":
            role, o = REF.alias(), REF.alias()
            roles = [role.c.resource_type == "PractitionerRole", role.c.param == "practitioner",
                     role.c.target_type == "Practitioner", role.c.target_id == id_expr]
            ours = sa.select(sa.literal(1)).select_from(role.join(o, sa.and_(
                o.c.resource_type == "PractitionerRole", o.c.resource_id == role.c.resource_id,
                o.c.param == "organization", o.c.target_type == "Organization"))).where(
                    *roles, self.in_tree(o.c.target_id)).exists()
            return sa.or_(ours, ~sa.exists().where(*roles))  # a Practitioner nobody employs yet
        return ~self._not_desk  # terminology and knowledge: the alliance desk

    def audit(self, type_expr: Expr, id_expr: Expr) -> sa.ColumnElement[bool]:
        if not self.auditor:
            return sa.false()
        a = REF.alias()
        return self._agent_exists(a, a.c.resource_type == type_expr, a.c.resource_id == id_expr, a.c.param == "agent")


class _BothRules(_Rules):
    """An organization's user inside one patient's context (EHR launch): both must allow."""

    def __init__(self, organization: _OrganizationRules, patient: _PatientRules) -> None:
        super().__init__(auditor=organization.auditor, base_url=organization.base_url)
        self.parts = (organization, patient)

    def rule(self, resource_type: str, type_expr: Expr, id_expr: Expr, *, write: bool) -> sa.ColumnElement[bool]:
        return sa.and_(*(p.rule(resource_type, type_expr, id_expr, write=write) for p in self.parts))

    def any_type(self, type_col: sa.ColumnElement[Any], id_col: sa.ColumnElement[Any]) -> sa.ColumnElement[bool]:
        return sa.and_(*(p.any_type(type_col, id_col) for p in self.parts))

    def on_target(self, resource_type: str, *, write: bool) -> sa.ColumnElement[bool]:
        return sa.and_(*(p.on_target(resource_type, write=write) for p in self.parts))


class BoundaryPolicy:
    """``visible`` and ``check_write`` of the AccessPolicy protocol: organization boundaries.

    ``settings`` gives ``auth`` (``off``: callers without organization and patient are not
    restricted) and ``base_url`` (absolute attachment URLs). Combine with the scope policy
    (``service.security.build_policy``); used alone, it allows every interaction.
    """

    def __init__(self, settings: Settings | None = None) -> None:
        settings = settings or get_settings()
        self.auth_enabled = str(settings.auth).lower() not in ("off", "false", "0", "no")
        self.base_url = settings.base_url

    # -- AccessPolicy ------------------------------------------------------------------------
    def authorize(self, ctx: AccessContext, interaction: str, resource_type: str) -> None:
        """Nothing: which interactions a client may use at all is decided by its SMART scopes
        (``service.security.scopes.ScopePolicy``); this policy decides which instances."""
        return None

    def visible(self, ctx: AccessContext, resource_type: str, type_col: sa.ColumnElement[Any],
                id_col: sa.ColumnElement[Any]) -> sa.ColumnElement[bool] | None:
        rules = self.rules_for(ctx)
        if rules is None:
            # Not restricted (development without authentication). The audit trail stays out
            # of the system-wide history, a change feed of the record, unless one audits.
            if resource_type == "*" and not is_auditor(ctx):
                return type_col.not_in(sorted(AUDIT_TYPES))
            return None
        return _about(type_col, id_col, rules.on_target(resource_type, write=False))

    def visibility_key(self, ctx: AccessContext) -> Hashable | None:
        """What :meth:`visible` depends on: the settings and what :meth:`rules_for` builds the
        caller's rules from (its cache key)."""
        return ("boundary", self.base_url, self.auth_enabled, ctx.system, ctx.organization, ctx.patient,
                is_auditor(ctx))

    def check_write(self, ctx: AccessContext, resource_type: str, resource: dict[str, Any] | None,
                    previous: dict[str, Any] | None) -> None:
        """What can be decided from the content alone; the boundary itself is checked against
        the database by the hooks of :meth:`install_hooks`, inside the write's transaction."""
        rules = self.rules_for(ctx)
        if rules is None:
            return
        if resource_type in AUDIT_TYPES:
            raise Forbidden(f"{resource_type} is written by the server only")
        if isinstance(rules, _NobodyRules):
            raise Forbidden("writing needs an organization or a patient context")

    # -- rules -------------------------------------------------------------------------------
    def rules_for(self, ctx: AccessContext) -> _Rules | None:
        """The caller's rules; None when the caller is not restricted."""
        if ctx.system:
            return None
        key = (ctx.organization, ctx.patient, is_auditor(ctx))
        cached = _RULES_CACHE.get((self.base_url, self.auth_enabled, key))
        if cached is not None:
            return cached[0]
        rules = self._build(ctx)
        if len(_RULES_CACHE) > 512:  # each holds a few built clauses; callers repeat a lot
            _RULES_CACHE.clear()
        _RULES_CACHE[(self.base_url, self.auth_enabled, key)] = (rules,)
        return rules

    def _build(self, ctx: AccessContext) -> _Rules | None:
        common = {"auditor": is_auditor(ctx), "base_url": self.base_url}
        org_id = _local_id(ctx.organization, "Organization")
        patient_id = _local_id(ctx.patient, "Patient")
        org = _OrganizationRules(org_id, **common) if org_id else None
        patient = _PatientRules(patient_id, **common) if patient_id else None
        if org and patient:
            return _BothRules(org, patient)
        if org or patient:
            return org or patient
        if ctx.organization or ctx.patient:  # named, but not as a valid reference: nobody
            return _NobodyRules(**common)
        return _NobodyRules(**common) if self.auth_enabled else None

    def may_see(self, conn: sa.Connection, ctx: AccessContext, resource_type: str, resource_id: str, *,
                write: bool = False) -> bool:
        """Whether the caller may see (``write``: change) this stored resource now."""
        rules = self.rules_for(ctx)
        if rules is None:
            return True
        return conn.execute(sa.select(TARGET.c.id).where(
            TARGET.c.resource_type == resource_type, TARGET.c.id == resource_id,
            rules.on_target(resource_type, write=write))).first() is not None

    # -- write checks (hooks) -------------------------------------------------------------------
    def install_hooks(self, hooks: WriteHooks) -> None:
        """Register the write checks on the store's hooks (once per hooks object, whoever asks:
        ``create_app`` through the combined policy, ``boundaries_install.install``)."""
        if hooks in _HOOKED:
            return
        _HOOKED.add(hooks)
        hooks.before(ANY_TYPE, self.before_write)
        hooks.after(ANY_TYPE, self.after_write)

    def before_write(self, event: WriteEvent) -> None:
        """The current version must be the caller's to change, and everything the new content
        points at must be visible to the caller (no access gained by referencing)."""
        rules = self.rules_for(event.ctx)
        if rules is None:
            return
        conn = event.tx.conn
        if event.previous is not None and not self.may_see(conn, event.ctx, event.resource_type, event.resource_id,
                                                           write=True):
            raise Forbidden(f"{_who(event.ctx)} may not change {event.resource_type}/{event.resource_id}")
        if event.resource is not None:
            self._check_targets(conn, rules, event)

    def after_write(self, event: WriteEvent) -> None:
        """The result must be inside the caller's boundary (nobody writes for others). Checked
        once for the whole transaction, just before COMMIT, on its final state."""
        rules = self.rules_for(event.ctx)
        if event.method == "DELETE" or rules is None:
            return
        if event.resource_type in CONTENT_TYPES and event.previous is None:
            return  # uploaded before the DocumentReference / referral that will link it
        checks = event.tx.before_commit(("yilian.boundaries", event.ctx),
                                        _ResultChecks(event.tx.conn, event.ctx, rules))
        assert isinstance(checks, _ResultChecks)
        checks.written[event.resource_type].add(event.resource_id)

    def _check_targets(self, conn: sa.Connection, rules: _Rules, event: WriteEvent) -> None:
        wanted: dict[str, set[str]] = defaultdict(set)
        for target_type, target_id in _targets(event.resource_type, event.resource or {}):
            if target_type in REFERENCE_TYPES or (target_type, target_id) == (event.resource_type, event.resource_id):
                continue
            wanted[target_type].add(target_id)
        if not wanted:
            return
        # one query for every type referenced (an Appointment names five): one round trip,
        # its statement built once per caller's rules and shape of the references
        types = sorted(wanted)
        pairs = [(t, i) for t in types for i in sorted(wanted[t])]
        shape = tuple((t, len(wanted[t])) for t in types)
        query = _statement(rules, ("targets", shape), lambda: Prepared(self._targets_query(rules, shape)))
        assert isinstance(query, Prepared)
        rows = query.rows(conn, {f"i{k}": i for k, (_, i) in enumerate(pairs)})
        hidden = sorted((t, rid) for t, rid, ok in rows if not ok)
        if hidden:
            raise Forbidden(f"{_who(event.ctx)} may not reference {hidden[0][0]}/{hidden[0][1]}")

    @staticmethod
    def _targets_query(rules: _Rules, shape: tuple[tuple[str, int], ...]) -> sa.Select:
        """(type, id, visible?) of the referenced resources: ids as parameters ``i0``, ``i1`` ..."""
        visible = sa.case(*((sa.and_(TARGET.c.resource_type == t, rules.on_target(t, write=False)), 1)
                            for t, _ in shape), else_=0)
        keys = [sa.tuple_(sa.literal(t), sa.bindparam(f"i{k}"))
                for k, t in enumerate(t for t, n in shape for _ in range(n))]
        return sa.select(TARGET.c.resource_type, TARGET.c.id, visible).where(
            sa.tuple_(TARGET.c.resource_type, TARGET.c.id).in_(keys))


#: Statements under one caller's rules, per (rules, shape): the rules are built once per caller
#: (``_RULES_CACHE``), so are these.
_STATEMENTS: StatementCache[sa.Select | Prepared] = StatementCache(2048)


def _statement(rules: _Rules, shape: Any, build: Callable[[], sa.Select | Prepared]) -> sa.Select | Prepared:
    return _STATEMENTS.get((rules, shape), build)  # the key keeps its rules alive: identity is safe


class _ResultChecks:
    """What one caller wrote in one transaction, checked against its boundary before COMMIT:
    one query per type however many resources a Bundle wrote."""

    def __init__(self, conn: sa.Connection, ctx: AccessContext, rules: _Rules) -> None:
        self.conn, self.ctx, self.rules = conn, ctx, rules
        self.written: dict[str, set[str]] = defaultdict(set)

    def __call__(self) -> None:
        for resource_type, ids in self.written.items():
            ordered = sorted(ids)
            for start in range(0, len(ordered), 500):
                chunk = ordered[start:start + 500]
                if len(chunk) == 1:  # a single write, the usual case: one prepared statement
                    one = _statement(self.rules, ("written-one", resource_type),
                                     lambda rt=resource_type: Prepared(self._query(rt, one=True)))  # type: ignore[misc]
                    assert isinstance(one, Prepared)
                    rows: Sequence[Any] = one.rows(self.conn, {"id": chunk[0]})
                else:
                    many = _statement(self.rules, ("written", resource_type),
                                      lambda rt=resource_type: self._query(rt))  # type: ignore[misc]
                    assert isinstance(many, sa.Select)
                    rows = self.conn.execute(many, {"ids": chunk}).all()
                outside = sorted(rid for rid, ok in rows if not ok)  # deleted meanwhile: nothing to check
                if outside:
                    raise Forbidden(f"{_who(self.ctx)} may not write {resource_type}/{outside[0]}: it would be "
                                    "outside the caller's organization boundary")

    def _query(self, resource_type: str, *, one: bool = False) -> sa.Select:
        """(id, inside?) of written resources of one type: ids as the expanding parameter ``ids``
        (``one``: a single id as ``id``)."""
        ids = TARGET.c.id == sa.bindparam("id") if one else TARGET.c.id.in_(sa.bindparam("ids", expanding=True))
        return sa.select(TARGET.c.id, sa.case((self.rules.on_target(resource_type, write=True), 1), else_=0)).where(
            TARGET.c.resource_type == resource_type, ids, TARGET.c.deleted == sa.false())


_RULES_CACHE: dict[tuple[Any, ...], tuple[_Rules | None]] = {}
_HOOKED: "weakref.WeakSet[WriteHooks]" = weakref.WeakSet()


class _Memoized(sa.ColumnElement[bool]):
    """A built rule whose statement cache key is fixed by what built it (the caller's identity
    and the resource type). SQLAlchemy would otherwise walk the whole clause on every execution
    to key its compiled-statement cache; with this, a read costs one dictionary lookup more
    than without a policy. The clause's bound values are constant for a given key."""

    __visit_name__ = "yilian_memoized_rule"
    inherit_cache = False
    type = sa.Boolean()

    def __init__(self, clause: sa.ColumnElement[bool], key: tuple[Any, ...]) -> None:
        self.clause = clause
        self.key = key

    def _gen_cache_key(self, anon_map: Any, bindparams: list[Any]) -> tuple[Any, ...]:
        return (type(self).__name__, self.key)


@compiles(_Memoized)
def _compile_memoized(element: _Memoized, compiler: Any, **kw: Any) -> str:
    # The rule's constants (codes, parameter names, the caller's ids) are rendered inline: the
    # cache key already pins them, and a hundred bound parameters would otherwise be processed
    # on every execution. Ids are checked against the FHIR id syntax before they get here.
    kw["literal_binds"] = True
    return "(" + compiler.process(element.clause, **kw) + ")"


def _about(type_col: sa.ColumnElement[Any], id_col: sa.ColumnElement[Any],
           rule: sa.ColumnElement[bool]) -> sa.ColumnElement[bool]:
    """``rule`` (over :data:`TARGET`) for the row the caller's columns name: one primary-key
    lookup ties them together, so the big clause itself never has to be rebuilt."""
    return _exists(TARGET, TARGET.c.resource_type == type_col, TARGET.c.id == id_col, rule)


def _who(ctx: AccessContext) -> str:
    return ctx.organization or ctx.patient or ctx.client_id or "the caller"


def _targets(resource_type: str, resource: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(type, id) of every reference of the resource (as the indexer reads them, absolute
    URLs included), and of a DocumentReference's attachment URLs."""
    for literal in _reference_literals(resource):
        target_type, target_id, _ = reference_row(literal)
        if target_type and target_id:
            yield target_type, target_id
    if resource_type == "DocumentReference":
        for content in resource.get("content") or []:
            url = (content.get("attachment") or {}).get("url") if isinstance(content, dict) else None
            if isinstance(url, str):
                target_type, target_id, _ = reference_row(url)
                if target_type and target_id:
                    yield target_type, target_id


def _reference_literals(node: Any) -> Iterator[str]:
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            reference = item.get("reference")
            if isinstance(reference, str) and reference and not reference.startswith("#"):
                yield reference
            stack.extend(v for k, v in item.items() if k != "contained" and isinstance(v, (dict, list)))
        elif isinstance(item, list):
            stack.extend(v for v in item if isinstance(v, (dict, list)))


__all__ = ["BoundaryPolicy", "is_auditor"]
