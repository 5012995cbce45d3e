"""Small FHIR helpers of the capacity package: codes, references, instants, the pool tag."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

from service.fhir.errors import BadRequest

BASE = "https://yilian.example.org/fhir"
POOL_SYSTEM = f"{BASE}/CodeSystem/capacity-pool"
KIND_SYSTEM = f"{BASE}/CodeSystem/capacity-kind"
ORG_TYPE_SYSTEM = f"{BASE}/CodeSystem/organization-type"
REFERRAL_DIRECTION_SYSTEM = f"{BASE}/CodeSystem/referral-direction"
PHYSICAL_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/location-physical-type"
BED_STATUS_SYSTEM = "http://terminology.hl7.org/CodeSystem/v2-0116"

RESERVED, GENERAL = "reserved", "general"
POOL_DISPLAY = {RESERVED: "预留号源（家庭医生/基层转诊）", GENERAL: "普通号源"}
KINDS = ("specialist", "outpatient", "exam", "inpatient")
KIND_DISPLAY = {"specialist": "专家门诊", "outpatient": "普通门诊", "exam": "预约检查", "inpatient": "住院"}

#: China has one time zone and no daylight saving: the day of a slot is its day at +08:00.
CHINA = timezone(timedelta(hours=8), "Asia/Shanghai")


def utc(moment: datetime) -> datetime:
    """Timestamps come back zone-less from SQLite; we always store and compare UTC."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def parse_instant(value: Any, where: str) -> datetime:
    """An instant, or a date / dateTime without zone read as Asia/Shanghai (as search does)."""
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{where} needs a date or instant", expression=where)
    text = value.strip()
    try:
        if len(text) == 10:
            moment = datetime.combine(date.fromisoformat(text), datetime.min.time())
        else:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(f"{where} = {value!r} is not a date or instant like 2026-03-02T08:00:00+08:00",
                         expression=where) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=CHINA)
    return moment.astimezone(UTC)


def china_day(moment: datetime) -> date:
    return moment.astimezone(CHINA).date()


def fhir_instant(moment: datetime) -> str:
    """As Yilian writes instants for people in China: local time with +08:00."""
    return moment.astimezone(CHINA).isoformat(timespec="seconds")


def ref_of(value: Any) -> str | None:
    """``Type/id`` of a Reference (absolute URLs and ``/_history/n`` trimmed), else None."""
    reference = value.get("reference") if isinstance(value, dict) else value
    if not isinstance(reference, str) or "/" not in reference or reference.startswith("#"):
        return None
    parts = [p for p in reference.split("?")[0].split("/") if p]
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    return "/".join(parts[-2:]) if len(parts) >= 2 else None


def split_ref(reference: str) -> tuple[str, str]:
    resource_type, _, resource_id = reference.partition("/")
    return resource_type, resource_id


def codings(concepts: Any) -> list[dict[str, Any]]:
    """Every Coding of a CodeableConcept or a list of them."""
    if isinstance(concepts, dict):
        concepts = [concepts]
    return [c for cc in concepts or [] if isinstance(cc, dict) for c in cc.get("coding", []) if isinstance(c, dict)]


def codes_of(concepts: Any, system: str) -> set[str]:
    return {c.get("code") for c in codings(concepts) if c.get("system") == system and c.get("code")}


def first_token(concepts: Any) -> str | None:
    """"system|code" of the first coded value, for the capacity table's match columns."""
    for coding in codings(concepts):
        if coding.get("code"):
            return f"{coding.get('system', '')}|{coding['code']}"
    return None


def token_matches(stored: str | None, wanted: str) -> bool:
    """FHIR token semantics: ``system|code``, ``|code`` (no system) or plain ``code``."""
    if not stored:
        return False
    if "|" not in wanted:
        return stored.rsplit("|", 1)[1] == wanted
    return stored == wanted


def pool_of(resource: dict[str, Any] | None) -> str | None:
    for tag in ((resource or {}).get("meta") or {}).get("tag", []):
        if tag.get("system") == POOL_SYSTEM:
            return tag.get("code")
    return None


def set_pool_tag(resource: dict[str, Any], pool: str) -> None:
    """Mark the pool visibly (and searchably: ``pool`` parameter) in ``meta.tag``."""
    meta = resource.setdefault("meta", {})
    tags = [t for t in meta.get("tag", []) if t.get("system") != POOL_SYSTEM]
    tags.append({"system": POOL_SYSTEM, "code": pool, "display": POOL_DISPLAY[pool]})
    meta["tag"] = tags


def kind_concept(kind: str) -> dict[str, Any]:
    return {"coding": [{"system": KIND_SYSTEM, "code": kind, "display": KIND_DISPLAY[kind]}],
            "text": KIND_DISPLAY[kind]}


def is_bed(location: dict[str, Any] | None) -> bool:
    return bool(location) and "bd" in codes_of((location or {}).get("physicalType"), PHYSICAL_TYPE_SYSTEM)
