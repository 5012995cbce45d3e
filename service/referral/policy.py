"""Referral policy as data: ``mappings/referral-policy.json`` (and the catalogue beside it).

Everything a city may set differently lives in the file, each value with the rule id of
``domain.md`` it implements: which services each direction may ask for, the green channel
(R34), SLA deadlines per priority (R31), what closes the loop (R41), the follow-up plan (R41),
long prescriptions (R12a), deductibles (R33), lead hospitals and referral desks per alliance.

:func:`load_config` reads and checks all of it at start; any problem raises
:class:`PolicyError` (or ``CatalogueError``) naming the file and the field, and nothing is
half-loaded. ``YILIAN_MAPPINGS_DIR`` / ``YILIAN_PROFILES_DIR`` point elsewhere (tests, sites).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from service.referral.catalogue import Catalogue, CatalogueError, criterion_codes, load_catalogue
from service.referral.codes import LEVELS
from service.referral.profile import Profile, ProfileError, load_profile

_ROOT = Path(__file__).resolve().parents[2]
PRIORITIES = ("routine", "urgent", "asap", "stat")
TASK_STATUSES = ("draft", "requested", "received", "accepted", "rejected", "ready", "cancelled", "in-progress",
                 "on-hold", "failed", "completed", "entered-in-error")
_DURATION = re.compile(r"^P(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?)?$")


class PolicyError(ValueError):
    """``referral-policy.json`` is malformed; the message names the file and the field."""


def mappings_dir() -> Path:
    return Path(os.environ.get("YILIAN_MAPPINGS_DIR", _ROOT / "mappings"))


def profiles_dir() -> Path:
    return Path(os.environ.get("YILIAN_PROFILES_DIR", _ROOT / "fhir_profiles"))


def parse_duration(text: Any, where: str) -> timedelta:
    match = _DURATION.match(text) if isinstance(text, str) else None
    if not match or not any(match.groups()) or text.endswith("T"):
        raise PolicyError(f"{where}: {text!r} is not an ISO 8601 duration like PT2H, PT48H or P14D")
    days, hours, minutes = (int(g or 0) for g in match.groups())
    return timedelta(days=days, hours=hours, minutes=minutes)


@dataclass(frozen=True)
class Deadline:
    """One SLA rule: a referral Task of ``priority`` must leave ``statuses`` within ``within``."""

    id: str
    priority: str
    step: str
    statuses: frozenset[str]
    within: timedelta
    rule: str


@dataclass(frozen=True)
class AllianceSetting:
    lead_hospital: str | None
    referral_desk: str | None


@dataclass(frozen=True)
class Policy:
    source: str
    services: dict[str, frozenset[str]]  # direction → service codes
    green_channel: frozenset[str]  # priorities (R34)
    unlisted: dict[str, str]  # direction → allow | refuse
    deadlines: tuple[Deadline, ...]
    sweep_interval: timedelta
    completion_documents: frozenset[tuple[str, str]]  # (system, code) of DocumentReference.type
    follow_up_days: tuple[int, ...]
    require_discharge_document: bool
    bed_request_priority: str
    long_prescription_max: timedelta  # R12a
    long_prescription_min: timedelta
    deductible: dict[str, dict[str, float]]  # coverage type → level → CNY (R33)
    currency: str
    designated: str  # alliance-members
    alliances: dict[str, AllianceSetting]

    def deadline_for(self, priority: str | None, status: str | None) -> Deadline | None:
        return next((d for d in self.deadlines if d.priority == (priority or "routine") and status in d.statuses), None)


@dataclass(frozen=True)
class ReferralConfig:
    """Everything the referral package reads from files, loaded together at start."""

    policy: Policy
    catalogue: Catalogue
    profile: Profile


def load_config(mappings: Path | None = None, profiles: Path | None = None) -> ReferralConfig:
    mappings = mappings or mappings_dir()
    profiles = profiles or profiles_dir()
    try:
        profile = load_profile(profiles / "StructureDefinition-yilian-referral.json")
        criteria = criterion_codes(profiles)
    except (OSError, ValueError) as exc:
        if isinstance(exc, (ProfileError, CatalogueError)):
            raise
        raise ProfileError(f"{profiles}: {exc}") from None
    catalogue = load_catalogue(mappings / "referral-catalogue.csv", criteria)
    policy = load_policy(mappings / "referral-policy.json")
    return ReferralConfig(policy, catalogue, profile)


def load_policy(path: Path) -> Policy:
    name = path.name
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PolicyError(f"{name}: cannot read the referral policy: {exc}") from None
    if not isinstance(doc, dict):
        raise PolicyError(f"{name}: not a JSON object")

    def section(key: str) -> dict[str, Any]:
        value = doc.get(key)
        if not isinstance(value, dict):
            raise PolicyError(f"{name}: {key} is missing or not an object")
        if key != "alliances" and not value.get("rule"):
            raise PolicyError(f"{name}: {key}.rule is missing: every policy value names its rule id")
        return value

    services = section("services")
    service_map = {}
    for direction in ("up", "down"):
        codes = services.get(direction)
        if not isinstance(codes, list) or not codes:
            raise PolicyError(f"{name}: services.{direction} must list service codes")
        service_map[direction] = frozenset(codes)
    green = section("green_channel").get("priorities")
    if not isinstance(green, list) or not set(green) <= set(PRIORITIES):
        raise PolicyError(f"{name}: green_channel.priorities must be a list of {', '.join(PRIORITIES)}")
    unlisted_section = section("unlisted_conditions")
    unlisted = {d: unlisted_section.get(d, "allow") for d in ("up", "down")}
    if not set(unlisted.values()) <= {"allow", "refuse"}:
        raise PolicyError(f"{name}: unlisted_conditions.up/down must be allow or refuse")

    sla = section("sla")
    deadlines = []
    seen: set[str] = set()
    for i, raw in enumerate(sla.get("deadlines") or []):
        where = f"{name}: sla.deadlines[{i}]"
        if not isinstance(raw, dict):
            raise PolicyError(f"{where}: not an object")
        for key in ("id", "priority", "step", "statuses", "within", "rule"):
            if not raw.get(key):
                raise PolicyError(f"{where}: {key} is missing")
        if raw["id"] in seen:
            raise PolicyError(f"{where}: id {raw['id']} is used twice")
        seen.add(raw["id"])
        if raw["priority"] not in PRIORITIES:
            raise PolicyError(f"{where}: priority {raw['priority']!r} is not one of {', '.join(PRIORITIES)}")
        if not isinstance(raw["statuses"], list) or not set(raw["statuses"]) <= set(TASK_STATUSES):
            raise PolicyError(f"{where}: statuses must be Task statuses")
        deadline = Deadline(raw["id"], raw["priority"], raw["step"], frozenset(raw["statuses"]),
                            parse_duration(raw["within"], f"{where}.within"), raw["rule"])
        clash = next((d for d in deadlines if d.priority == deadline.priority and d.statuses & deadline.statuses), None)
        if clash:
            raise PolicyError(f"{where}: {deadline.id} and {clash.id} both time {deadline.priority} referrals in "
                              f"{', '.join(sorted(clash.statuses & deadline.statuses))}")
        deadlines.append(deadline)
    sweep_interval = parse_duration(sla.get("sweep_interval", "PT5M"), f"{name}: sla.sweep_interval")

    completion = section("completion")
    documents = frozenset((d.get("system", ""), d.get("code", "")) for d in completion.get("document_types") or [])
    if not documents or any(not s or not c for s, c in documents):
        raise PolicyError(f"{name}: completion.document_types must list {{system, code}} objects")

    downward = section("downward")
    days = downward.get("follow_up_days")
    if not isinstance(days, list) or not all(isinstance(d, int) and d > 0 for d in days):
        raise PolicyError(f"{name}: downward.follow_up_days must be a list of positive whole days")
    bed_priority = downward.get("bed_request_priority", "urgent")
    if bed_priority not in PRIORITIES:
        raise PolicyError(f"{name}: downward.bed_request_priority must be one of {', '.join(PRIORITIES)}")

    prescription = section("long_prescription")
    low, high = prescription.get("min_weeks"), prescription.get("max_weeks")
    if not isinstance(low, int) or not isinstance(high, int) or not 0 < low <= high:
        raise PolicyError(f"{name}: long_prescription.min_weeks/max_weeks must be whole weeks, min <= max")

    insurance = section("insurance")
    deductible: dict[str, dict[str, float]] = {}
    for scheme, by_level in (insurance.get("deductible") or {}).items():
        if not isinstance(by_level, dict) or not set(by_level) <= set(LEVELS) or \
                not all(isinstance(v, (int, float)) and v >= 0 for v in by_level.values()):
            raise PolicyError(f"{name}: insurance.deductible.{scheme} must map levels "
                              f"({', '.join(LEVELS)}) to amounts >= 0")
        deductible[scheme] = {level: float(v) for level, v in by_level.items()}
    if insurance.get("designated", "alliance-members") != "alliance-members":
        raise PolicyError(f"{name}: insurance.designated supports alliance-members only")

    alliances = {}
    for key, value in (doc.get("alliances") or {}).items():
        if key == "note":
            continue
        if not key.startswith("Organization/") or not isinstance(value, dict):
            raise PolicyError(f"{name}: alliances.{key}: key must be Organization/<id> and value an object")
        alliances[key] = AllianceSetting(value.get("lead_hospital"), value.get("referral_desk"))

    return Policy(
        source=name, services=service_map, green_channel=frozenset(green), unlisted=unlisted,
        deadlines=tuple(deadlines), sweep_interval=sweep_interval, completion_documents=documents,
        follow_up_days=tuple(days), require_discharge_document=bool(downward.get("require_discharge_document", True)),
        bed_request_priority=bed_priority, long_prescription_max=timedelta(weeks=high),
        long_prescription_min=timedelta(weeks=low), deductible=deductible,
        currency=insurance.get("currency", "CNY"), designated="alliance-members", alliances=alliances,
    )
