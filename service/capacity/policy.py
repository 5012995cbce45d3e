"""Capacity policy: what share is reserved where, and when it is released (R20, R21, R23, R32).

The defaults live in ``mappings/capacity-policy.json`` with the rule id beside each value and
are validated when loaded. An alliance, a hospital (``Organization/<id>``) and a department
(``HealthcareService/<id>``) may override any field; overrides are rows of
``capacity_policy`` changed through ``/admin/capacity/policy`` and every change is kept in
``capacity_policy_history`` (who, when, old, new). The most specific scope wins.

A change applies to capacity published after it: the pool of a published schedule-day is
decided with the share in force when it was first published (``capacity_slot.share``).
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from service.capacity.tables import POLICIES, POLICY_HISTORY
from service.fhir.errors import Issue, PreconditionFailed, Unprocessable

log = logging.getLogger("yilian.capacity")

POLICY_FILE = Path(__file__).resolve().parents[2] / "mappings" / "capacity-policy.json"

SHARE_FIELDS = ("specialist_reserved_share", "outpatient_reserved_share", "exam_reserved_share", "bed_reserved_share")
DURATION_FIELDS = ("release_before", "bed_release_after", "hold_ttl", "booking_window")
#: capacity kinds (``capacity-kind`` CodeSystem) and the share that governs each
SHARE_BY_KIND = {"specialist": "specialist_reserved_share", "outpatient": "outpatient_reserved_share",
                 "exam": "exam_reserved_share", "inpatient": "bed_reserved_share"}
#: R20: "20–30 % of quality specialist slots"; outside this band is allowed but warned about
SPECIALIST_BAND = (0.20, 0.30)

_DURATION = re.compile(r"^P(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+)S)?)?$")


class PolicyError(ValueError):
    """A policy file or override that cannot be used; the message names the file and field."""


@dataclass(frozen=True)
class Policy:
    specialist_reserved_share: float
    outpatient_reserved_share: float
    exam_reserved_share: float
    bed_reserved_share: float
    release_before: timedelta
    bed_release_after: timedelta
    hold_ttl: timedelta
    booking_window: timedelta

    def share_for(self, kind: str) -> float:
        return float(getattr(self, SHARE_BY_KIND.get(kind, "specialist_reserved_share")))

    def merged(self, overrides: dict[str, Any], where: str = "override") -> Policy:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(parse_fields(overrides, where))
        return Policy(**values)

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = format_duration(value) if isinstance(value, timedelta) else value
        return out


# -- values ---------------------------------------------------------------------------------

def parse_share(value: Any, where: str) -> float:
    """0.25, "25%" or "1/3" → a fraction within [0, 1]."""
    try:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, (int, float)):
            share = float(value)
        elif isinstance(value, str) and value.strip().endswith("%"):
            share = float(value.strip()[:-1]) / 100
        elif isinstance(value, str):
            share = float(Fraction(value.strip()))
        else:
            raise ValueError
    except (ValueError, ZeroDivisionError):
        raise PolicyError(f"{where}: {value!r} is not a share (0.25, \"25%\" or \"1/3\")") from None
    if not 0 <= share <= 1 or math.isnan(share):
        raise PolicyError(f"{where}: {value!r} is outside 0..1")
    return share


def parse_duration(value: Any, where: str) -> timedelta:
    """ISO 8601 days/hours/minutes/seconds: "PT24H", "PT10M", "P14D"."""
    match = _DURATION.match(value) if isinstance(value, str) and value not in ("P", "PT") else None
    if match is None or not any(match.groups()):
        raise PolicyError(f"{where}: {value!r} is not an ISO 8601 duration like PT24H, PT10M or P14D")
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)


def format_duration(value: timedelta) -> str:
    seconds = int(value.total_seconds())
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    time = "".join(f"{n}{u}" for n, u in ((hours, "H"), (minutes, "M"), (secs, "S")) if n)
    return "P" + (f"{days}D" if days else "") + (f"T{time}" if time else ("" if days else "T0S"))


def parse_fields(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """Validate a partial policy ({field: raw value}); unknown fields are errors."""
    out: dict[str, Any] = {}
    for name, value in raw.items():
        if name in SHARE_FIELDS:
            out[name] = parse_share(value, f"{where}: {name}")
        elif name in DURATION_FIELDS:
            out[name] = parse_duration(value, f"{where}: {name}")
        else:
            known = ", ".join(SHARE_FIELDS + DURATION_FIELDS)
            raise PolicyError(f"{where}: {name} is not a policy field (known: {known})")
    return out


def warnings_for(values: dict[str, Any]) -> list[str]:
    """Allowed but unusual settings, said out loud (R20's 20–30 % band)."""
    share = values.get("specialist_reserved_share")
    low, high = SPECIALIST_BAND
    if isinstance(share, float) and not low <= share <= high:
        return [f"specialist_reserved_share {share:.2f} is outside the 0.20-0.30 band of R20"]
    return []


# -- the file -------------------------------------------------------------------------------

def load_policy_file(path: Path = POLICY_FILE) -> Policy:
    """Read and validate the defaults; a broken file stops the server with a clear message."""
    where = str(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PolicyError(f"{where}: the capacity policy file is missing") from None
    except json.JSONDecodeError as exc:
        raise PolicyError(f"{where}: not valid JSON ({exc})") from None
    entries = document.get("policy") if isinstance(document, dict) else None
    if not isinstance(entries, dict):
        raise PolicyError(f"{where}: needs an object 'policy' of {{field: {{value, rule}}}}")
    raw: dict[str, Any] = {}
    for name, entry in entries.items():
        if not isinstance(entry, dict) or "value" not in entry:
            raise PolicyError(f"{where}: policy.{name} needs a 'value' (and the 'rule' id it implements)")
        if not re.fullmatch(r"R\d+[a-z]?", str(entry.get("rule", ""))):
            raise PolicyError(f"{where}: policy.{name} needs the rule id from domain.md, e.g. \"rule\": \"R20\"")
        raw[name] = entry["value"]
    missing = [f for f in SHARE_FIELDS + DURATION_FIELDS if f not in raw]
    if missing:
        raise PolicyError(f"{where}: policy is missing {', '.join(missing)}")
    values = parse_fields(raw, f"{where}: policy")
    for warning in warnings_for(values):
        log.warning("%s: %s", where, warning)
    return Policy(**values)


@lru_cache(maxsize=1)
def default_policy() -> Policy:
    return load_policy_file()


# -- the database ---------------------------------------------------------------------------

def scopes_for(alliance: str | None, organization: str | None, department: str | None) -> list[str]:
    """Override scopes from the least to the most specific."""
    return [s for s in (alliance, organization, department) if s]


def effective_policy(conn: sa.Connection, scopes: list[str]) -> Policy:
    policy = default_policy()
    if not scopes:
        return policy
    rows = dict(conn.execute(sa.select(POLICIES.c.scope, POLICIES.c.settings)
                             .where(POLICIES.c.scope.in_(scopes))).all())
    for scope in scopes:
        if scope in rows:
            policy = policy.merged(rows[scope], where=f"capacity_policy[{scope}]")
    return policy


def get_override(conn: sa.Connection, scope: str) -> dict[str, Any] | None:
    row = conn.execute(sa.select(POLICIES.c.settings, POLICIES.c.version, POLICIES.c.updated_at, POLICIES.c.updated_by)
                       .where(POLICIES.c.scope == scope)).first()
    if row is None:
        return None
    return {"scope": scope, "settings": row[0], "version": row[1], "updated_at": _iso(row[2]), "updated_by": row[3]}


def list_overrides(conn: sa.Connection) -> list[dict[str, Any]]:
    scopes = conn.execute(sa.select(POLICIES.c.scope).order_by(POLICIES.c.scope)).scalars().all()
    return [o for o in (get_override(conn, s) for s in scopes) if o]


def set_override(conn: sa.Connection, scope: str, changes: dict[str, Any], *, actor: str | None, now: datetime,
                 if_match: int | None = None) -> tuple[dict[str, Any], list[str]]:
    """Merge ``changes`` into the scope's overrides (a null value removes the field), validate,
    store, and record the change in the history. Returns (override, warnings)."""
    issues = []
    for name, value in changes.items():
        if name not in SHARE_FIELDS + DURATION_FIELDS:
            known = ", ".join(SHARE_FIELDS + DURATION_FIELDS)
            issues.append(Issue("error", "value", f"{name} is not a policy field (known: {known})", (name,)))
        elif value is not None:
            try:
                parse_fields({name: value}, "body")
            except PolicyError as exc:
                issues.append(Issue("error", "value", str(exc), (name,)))
    if issues:
        raise Unprocessable(issues=issues)
    row = conn.execute(sa.select(POLICIES.c.settings, POLICIES.c.version).where(POLICIES.c.scope == scope)
                       .with_for_update()).first()
    old = dict(row[0]) if row else None
    if if_match is not None and (row is None or row[1] != if_match):
        raise PreconditionFailed(f"the policy of {scope} is at version {row[1] if row else 0}, not {if_match}")
    new = {**(old or {}), **changes}
    new = {k: v for k, v in new.items() if v is not None}
    if row is None:
        conn.execute(POLICIES.insert().values(scope=scope, settings=new, version=1, updated_at=now, updated_by=actor))
    else:
        conn.execute(POLICIES.update().where(POLICIES.c.scope == scope)
                     .values(settings=new, version=row[1] + 1, updated_at=now, updated_by=actor))
    record_change(conn, scope, old, new, actor=actor, now=now)
    return get_override(conn, scope) or {}, warnings_for(parse_fields(new, "body"))


def delete_override(conn: sa.Connection, scope: str, *, actor: str | None, now: datetime) -> bool:
    row = conn.execute(sa.select(POLICIES.c.settings).where(POLICIES.c.scope == scope).with_for_update()).first()
    if row is None:
        return False
    conn.execute(POLICIES.delete().where(POLICIES.c.scope == scope))
    record_change(conn, scope, dict(row[0]), None, actor=actor, now=now)
    return True


def record_change(conn: sa.Connection, scope: str, old: dict[str, Any] | None, new: dict[str, Any] | None, *,
                  actor: str | None, now: datetime) -> None:
    """The policy's own history (who, when, old, new), served by the admin API's ``_history``.
    The API layer also records each change as an AuditEvent (``service.api.capacity``)."""
    conn.execute(POLICY_HISTORY.insert().values(scope=scope, changed_at=now, changed_by=actor, old=old, new=new))


def history(conn: sa.Connection, scope: str) -> list[dict[str, Any]]:
    rows = conn.execute(sa.select(POLICY_HISTORY).where(POLICY_HISTORY.c.scope == scope)
                        .order_by(POLICY_HISTORY.c.seq.desc())).mappings().all()
    return [{"seq": r["seq"], "scope": r["scope"], "changed_at": _iso(r["changed_at"]), "changed_by": r["changed_by"],
             "old": r["old"], "new": r["new"]} for r in rows]


def _iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    from datetime import UTC

    moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return moment.isoformat().replace("+00:00", "Z")
