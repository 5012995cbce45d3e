"""Where a referral goes, and whether the catalogue supports it (R31, R34, R40, R41).

* :func:`route_upward`: the lead hospital of the patient's alliance first, then the alliance's
  other hospitals at a level the catalogue names; each with the department whose
  HealthcareService offers the catalogue row's specialty.
* :func:`route_downward`: the grassroots institution and team of the patient's active
  family-doctor contract (a CarePlan of category ``family-doctor-contract``), else the
  grassroots institution of the patient's home address (same district), else the patient's
  ``managingOrganization`` when it is a grassroots institution.
* :func:`assess_criteria`: the catalogue verdict — ``meets`` or ``against`` — with reasons
  citing the file, row and rule. The caller decides what ``against`` means (green channel,
  override, 422).

``POST ServiceRequest/$route`` returns exactly what the write path would do (:func:`route`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from service.fhir.errors import Unprocessable
from service.fhir.store import StoreTransaction
from service.referral import _directory as directory
from service.referral.catalogue import Entry
from service.referral.codes import (
    CAREPLAN_CATEGORY,
    CRITERION,
    DOWN,
    EXT_CRITERION,
    EXT_OVERRIDE_REASON,
    ICD10,
    SNOMED,
    UP,
    codes_in,
    direction_of,
    extension_value,
    extensions,
    ref_of,
    reference,
)
from service.referral.policy import ReferralConfig

MEETS, AGAINST = "meets", "against"
_LEVEL_RANK = {"tertiary": 0, "secondary": 1, "primary": 2}


@dataclass(frozen=True)
class Candidate:
    """A possible receiver: the institution (the Task's owner) and where inside it."""

    organization: str
    name: str | None
    department: str | None = None  # upward: a department Organization of the hospital
    department_name: str | None = None
    care_team: str | None = None  # downward: the contracted family-doctor team
    care_team_name: str | None = None
    reasons: tuple[str, ...] = ()

    def performers(self) -> list[dict[str, str]]:
        out = [reference(self.organization, self.name)]
        if self.department:
            out.append(reference(self.department, self.department_name))
        if self.care_team:
            out.append(reference(self.care_team, self.care_team_name))
        return out


@dataclass(frozen=True)
class Assessment:
    verdict: str  # meets | against
    reasons: tuple[str, ...]
    entry: Entry | None = None  # the catalogue row that decided (None: not catalogued)
    icd10: str | None = None


@dataclass(frozen=True)
class Route:
    direction: str
    sender: str | None  # the referring institution
    sender_level: str | None
    alliance: str | None
    assessment: Assessment
    green_channel: bool
    override_reason: str | None
    candidates: tuple[Candidate, ...] = field(default=())

    @property
    def against_criteria(self) -> bool:
        return self.assessment.verdict == AGAINST

    @property
    def refused(self) -> bool:
        """Against the criteria with neither the green channel (R34) nor an override reason (R31)."""
        return self.against_criteria and not self.green_channel and not self.override_reason


def route(tx: StoreTransaction, config: ReferralConfig, sr: dict[str, Any]) -> Route:
    """Candidates and the catalogue verdict for a referral (sent or a dry run)."""
    direction = direction_of(sr)
    if direction not in (UP, DOWN):
        raise Unprocessable("ServiceRequest.category: a referral needs category up or down (CodeSystem "
                            "referral-direction)",
                            expression="ServiceRequest.category")
    patient_ref = ref_of(sr.get("subject"))
    patient = directory.content(tx, patient_ref) if patient_ref and patient_ref.startswith("Patient/") else None
    if patient is None:
        raise Unprocessable(f"ServiceRequest.subject {patient_ref or '(none)'} is no Patient on this server",
                            expression="ServiceRequest.subject")
    requester_org = directory.organization_of_role(tx, ref_of(sr.get("requester")))
    sender = directory.institution_of(tx, requester_org)
    sender_level = directory.institution_level(tx, requester_org)
    alliance = (directory.alliance_of(tx, sender)
                or directory.alliance_of(tx, ref_of(patient.get("managingOrganization"))))
    assessment = assess_criteria(config, sr, direction, sender_level)
    if direction == UP:
        candidates = route_upward(tx, config, alliance, sender, assessment.entry)
    else:
        candidates = route_downward(tx, config, alliance, sender, patient_ref or "", patient)
    return Route(direction, sender, sender_level, alliance, assessment,
                 green_channel=(sr.get("priority") or "routine") in config.policy.green_channel,
                 override_reason=(extension_value(sr, EXT_OVERRIDE_REASON, "String") or "").strip() or None,
                 candidates=tuple(candidates))


# -- the catalogue verdict ---------------------------------------------------------------------

def assess_criteria(config: ReferralConfig, sr: dict[str, Any], direction: str, sender_level: str | None) -> Assessment:
    """Does the catalogue support referring this patient in ``direction``? (R31 up, R40 down)

    Every ICD-10 reason is judged; one reason that meets the criteria justifies the referral.
    """
    source = config.catalogue.source
    claimed = {c.get("code") for e in extensions(sr, EXT_CRITERION) for c in [e.get("valueCoding") or {}]
               if c.get("system") == CRITERION}
    reasons = [code for rc in sr.get("reasonCode") or [] for code in codes_in(rc, ICD10)]
    judged: list[Assessment] = []
    unlisted = config.policy.unlisted[direction]
    for code in reasons or [None]:
        entry = config.catalogue.lookup(code) if code else None

        def judge(meets: bool, why: str, entry: Entry | None = entry, code: str | None = code) -> None:
            judged.append(Assessment(MEETS if meets else AGAINST, (why,), entry, code))

        if entry is None:
            what = f"ICD-10 {code}" if code else "a referral without an ICD-10 reason"
            judge(unlisted == "allow", f"{what} is in no row of {source}; {config.policy.source} "
                                       f"unlisted_conditions.{direction} = {unlisted} (R31)")
            continue
        row = f"{code} {entry.name}: {source} row {entry.row} ({entry.code}, levels {';'.join(sorted(entry.levels))})"
        if direction == UP:
            level = sender_level or "primary"
            met = sorted(claimed & set(entry.up_criteria))
            if level not in entry.levels:
                judge(True, f"{row} is not treated at the {level} level: refer up ({entry.rule})")
            elif met:
                judge(True, f"{row}; upward criterion {', '.join(met)} met ({entry.rule})")
            else:
                needed = ", ".join(entry.up_criteria) or "none: this row is never referred up"
                judge(False, f"{row} is treated at the {level} level; an upward referral needs one of the "
                             f"criteria {needed} ({entry.rule})")
        else:
            met = sorted(claimed & set(entry.down_criteria))
            if entry.primary_treats:
                judge(True, f"{row} is on the grassroots catalogue: refer down (R40)")
            elif met:
                judge(True, f"{row}; downward criterion {', '.join(met)} met (R40)")
            else:
                needed = ", ".join(entry.down_criteria) or "none: this row is never referred down"
                judge(False, f"{row} is not on the grassroots catalogue; a downward referral needs one of the "
                             f"criteria {needed} (R40)")
    meeting = [a for a in judged if a.verdict == MEETS]
    decisive = meeting[0] if meeting else judged[0]
    return Assessment(decisive.verdict, tuple(r for a in judged for r in a.reasons), decisive.entry, decisive.icd10)


# -- upward ------------------------------------------------------------------------------------

def route_upward(tx: StoreTransaction, config: ReferralConfig, alliance: str | None, sender: str | None,
                 entry: Entry | None) -> list[Candidate]:
    """Hospitals of the alliance, the lead hospital first (R30, R31)."""
    if alliance is None:
        return []
    lead = lead_hospital(tx, config, alliance)
    wanted = entry.hospital_levels if entry else frozenset()
    ranked = []
    for ref, org, level in directory.hospitals(tx, alliance):
        if ref == sender:
            continue
        reasons = []
        score = 0
        if ref == lead:
            score += 2
            reasons.append(f"lead hospital of {alliance} (R31)")
        if entry and level in wanted:
            score += 1
            reasons.append(f"{level} level treats {entry.code} {entry.name} "
                           f"({config.catalogue.source} row {entry.row})")
        elif entry:
            reasons.append(f"{level} level; {entry.code} is catalogued for {';'.join(sorted(entry.levels))}")
        else:
            reasons.append(f"{level} member hospital of {alliance}")
        department, department_name, why = _department(tx, ref, entry)
        if why:
            reasons.append(why)
        ranked.append((-score, _LEVEL_RANK.get(level, 9), ref,
                       Candidate(ref, directory.display(org), department, department_name, reasons=tuple(reasons))))
    return [c for *_, c in sorted(ranked, key=lambda r: r[:3])]


def lead_hospital(tx: StoreTransaction, config: ReferralConfig, alliance: str) -> str | None:
    """The alliance's lead hospital: from the policy, else its highest-level member hospital."""
    setting = config.policy.alliances.get(alliance)
    if setting and setting.lead_hospital:
        return setting.lead_hospital
    found = sorted(directory.hospitals(tx, alliance), key=lambda h: (_LEVEL_RANK.get(h[2], 9), h[0]))
    return found[0][0] if found else None


def _department(tx: StoreTransaction, hospital: str, entry: Entry | None) -> tuple[str | None, str | None, str | None]:
    """The department of ``hospital`` whose HealthcareService offers the row's specialty."""
    if entry is None or not entry.department_specialty:
        return None, None, None
    for service_id in tx.find("HealthcareService", f"specialty={SNOMED}|{entry.department_specialty}", limit=100):
        service = tx.current_content("HealthcareService", service_id)
        provider = ref_of((service or {}).get("providedBy"))
        if service and service.get("active", True) and provider and provider != hospital \
                and directory.is_within(tx, provider, hospital):
            org = directory.content(tx, provider)
            return provider, directory.display(org), (f"department {directory.display(org) or provider} offers "
                                                      f"SNOMED CT {entry.department_specialty} "
                                                      f"(HealthcareService/{service_id})")
    return None, None, (f"no department of {hospital} offers SNOMED CT {entry.department_specialty}: "
                        "the hospital desk assigns one")


# -- downward ----------------------------------------------------------------------------------

def route_downward(tx: StoreTransaction, config: ReferralConfig, alliance: str | None, sender: str | None,
                   patient_ref: str, patient: dict[str, Any]) -> list[Candidate]:
    """The contracted institution and team first, then address, then managingOrganization (R41)."""
    found: dict[str, dict[str, Any]] = {}

    def add(org_ref: str | None, reason: str, team: str | None = None) -> None:
        if not org_ref or org_ref == sender:
            return
        slot = found.setdefault(org_ref, {"reasons": [], "team": None})
        slot["reasons"].append(reason)
        slot["team"] = slot["team"] or team

    for plan_id, plan in active_contracts(tx, patient_ref, tx.clock()):
        team = ref_of((plan.get("careTeam") or [None])[0])
        team_content = directory.content(tx, team) if team else None
        org = ref_of(((team_content or {}).get("managingOrganization") or [None])[0])
        if org is None:
            org = ref_of(plan.get("author"))
            org = directory.organization_of_role(tx, org) if org and org.startswith("PractitionerRole/") else org
        add(directory.institution_of(tx, org), f"active family-doctor contract CarePlan/{plan_id} (R1, R41)", team)
    if alliance:
        district = _home_district(patient)
        if district:
            for ref, org in directory.grassroots(tx, alliance):
                if any(a.get("district") == district for a in org.get("address") or []):
                    add(ref, f"grassroots institution of the patient's home district {district}")
    managing = ref_of(patient.get("managingOrganization"))
    if managing and directory.institution_level(tx, managing) == "primary":
        add(directory.institution_of(tx, managing), "the patient's managingOrganization")
    candidates = []
    for org_ref, slot in found.items():
        team = slot["team"] or _team_of_patient(tx, patient, org_ref)
        org = directory.content(tx, org_ref)
        team_content = directory.content(tx, team) if team else None
        candidates.append(Candidate(org_ref, directory.display(org), care_team=team,
                                    care_team_name=(team_content or {}).get("name"), reasons=tuple(slot["reasons"])))
    return candidates


def active_contracts(tx: StoreTransaction, patient_ref: str, now: datetime) -> list[tuple[str, dict[str, Any]]]:
    """Active family-doctor contracts of the patient whose period covers ``now`` (R1, R2)."""
    ids = tx.find("CarePlan", f"subject={patient_ref}&category={CAREPLAN_CATEGORY}|family-doctor-contract"
                              f"&status=active", limit=20)
    today = now.date().isoformat()
    out = []
    for plan_id in ids:
        plan = tx.current_content("CarePlan", plan_id)
        period = (plan or {}).get("period") or {}
        if plan and str(period.get("start", today))[:10] <= today <= str(period.get("end", today))[:10]:
            out.append((plan_id, plan))
    return out


def _home_district(patient: dict[str, Any]) -> str | None:
    addresses = [a for a in patient.get("address") or [] if isinstance(a, dict)]
    home = [a for a in addresses if a.get("use") == "home"] or addresses
    return next((a["district"] for a in home if a.get("district")), None)


def _team_of_patient(tx: StoreTransaction, patient: dict[str, Any], institution: str) -> str | None:
    """The active team at ``institution`` that the patient's general practitioner belongs to."""
    for gp in patient.get("generalPractitioner") or []:
        role = ref_of(gp)
        if not role or not role.startswith("PractitionerRole/"):
            continue
        for team_id in tx.find("CareTeam", f"participant={role}&status=active", limit=20):
            team = tx.current_content("CareTeam", team_id)
            managing = [ref_of(m) for m in (team or {}).get("managingOrganization") or []]
            if any(directory.is_within(tx, m, institution) for m in managing if m):
                return f"CareTeam/{team_id}"
    return None
