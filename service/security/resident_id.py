"""Resident identity card numbers (居民身份证号码, GB 11643-1999): validation on write.

The gateway identifies residents by this number (domain.md, "Actors"), so a wrong one is a
wrong person. Every Patient, RelatedPerson, Practitioner or Person identifier in the system
:data:`SYSTEM` is checked by a before-write hook on every write path (REST, Bundles, internal)
and refused with 422 naming ``<Type>.identifier[i].value``. Layout of the 18 characters::

    AAAAAA YYYYMMDD SSS C
    area   birth    seq check

``C`` is the ISO 7064 MOD 11-2 check character over the first 17 digits. A lowercase ``x``
is accepted and stored as ``X``. Error messages never repeat the number in full (it would
end up in logs and audit records): they show it masked.
"""

from __future__ import annotations

import re
from datetime import date

from service.fhir.errors import Issue, Unprocessable
from service.fhir.hooks import WriteEvent, WriteHooks

#: Weight of each of the first 17 digits: 2**(17 - i) mod 11 (ISO 7064 MOD 11-2).
WEIGHTS: tuple[int, ...] = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
#: Check character for each value of (weighted sum mod 11).
CHECK_CHARACTERS = "10X98765432"

SYSTEM = "urn:oid:2.16.156.10011.1.1"
"""Identifier.system the Chinese FHIR profiles use for the resident ID card number."""

#: Resource types whose ``identifier`` may carry a resident ID.
PERSON_TYPES = ("Patient", "RelatedPerson", "Practitioner", "Person")

_ID_RE = re.compile(r"^\d{17}[\dX]$")
#: Births before this year are typing errors, not residents (the oldest Chinese on record: 1886).
_EARLIEST_YEAR = 1880


def check_character(first17: str) -> str:
    """The check character (``0``-``9`` or ``X``) for the first 17 digits of an ID."""
    if len(first17) != 17 or not first17.isascii() or not first17.isdigit():
        raise ValueError(f"expected 17 digits, got {len(first17)} characters")
    total = sum(int(d) * w for d, w in zip(first17, WEIGHTS, strict=True))
    return CHECK_CHARACTERS[total % 11]


def normalize(resident_id: str) -> str:
    """The stored form: surrounding blanks removed, a lowercase check ``x`` as ``X``."""
    value = resident_id.strip()
    return value[:-1] + "X" if value.endswith("x") else value


def problem(resident_id: str, *, today: date | None = None) -> str | None:
    """Why ``resident_id`` (already normalised) is not a valid ID, or None when it is."""
    if len(resident_id) != 18:
        return f"has {len(resident_id)} characters; a resident ID has 18"
    if not _ID_RE.match(resident_id):
        return "must be 17 digits followed by a digit or X"
    try:
        birth = date(int(resident_id[6:10]), int(resident_id[10:12]), int(resident_id[12:14]))
    except ValueError:
        return f"has no valid birth date in characters 7-14 ({resident_id[6:14]})"
    if birth.year < _EARLIEST_YEAR or birth > (today or date.today()):
        return f"has an impossible birth date {birth.isoformat()}"
    expected = check_character(resident_id[:17])
    if resident_id[17] != expected:
        return "has a wrong check character (GB 11643-1999, ISO 7064 MOD 11-2)"
    return None


def is_valid(resident_id: str) -> bool:
    """Whether the string is 18 characters with a real birth date and a correct check character."""
    return problem(resident_id) is None


def mask(value: str) -> str:
    """``110105********002X``: the area code and the last four characters stay readable.
    Same length as the input, so masking a JSON body never changes its size."""
    if len(value) > 10:
        return value[:6] + "*" * (len(value) - 10) + value[-4:]
    return "*" * len(value)


def check_identifiers(event: WriteEvent) -> None:
    """Before-write hook: validate and normalise every resident ID of the resource."""
    resource = event.resource
    if not resource:
        return
    identifiers = resource.get("identifier")
    if not isinstance(identifiers, list):
        return
    issues: list[Issue] = []
    for index, identifier in enumerate(identifiers):
        if not isinstance(identifier, dict) or identifier.get("system") != SYSTEM:
            continue
        where = f"{event.resource_type}.identifier[{index}].value"
        value = identifier.get("value")
        if not isinstance(value, str):
            issues.append(Issue("error", "required", f"{where}: a resident ID needs a value", (where,)))
            continue
        value = normalize(value)
        why = problem(value)
        if why is not None:
            issues.append(Issue("error", "value", f"{where}: the resident ID {mask(value)} {why}", (where,)))
            continue
        identifier["value"] = value
    if issues:
        raise Unprocessable(issues=issues)


def install(hooks: WriteHooks) -> None:
    for resource_type in PERSON_TYPES:  # pure: looks at the resource only (Bundles keep the bulk path)
        hooks.before(resource_type, check_identifiers, pure=True)
