"""The disease catalogue per level and its referral criteria (R31), ``mappings/referral-catalogue.csv``.

County (city) medical groups say which conditions each level treats (县、乡两级疾病诊疗目录)
and when a patient goes up or comes down (转诊标准). One CSV row per condition:

``icd10``
    an ICD-10 code or category (``I10`` covers ``I10`` and every ``I10.x``) or an inclusive
    range of them (``I20-I25``). The most specific row wins: a longer code beats a shorter one,
    a code beats a range of the same length (``I25.2`` inside ``I20-I25``).
``levels``
    who treats it: ``primary`` (township / community catalogue), ``secondary``, ``tertiary``,
    separated by ``;``.
``up_criteria`` / ``down_criteria``
    codes of ``CodeSystem/referral-criterion`` that justify referring it up (when the sender's
    level treats it too) or down (when the grassroots level does not).
``department_specialty``
    SNOMED CT practice setting of the default receiving department (``394579002`` cardiology);
    empty sends it to the hospital as a whole.
``rule``, ``name``, ``note``: documentation; ``rule`` is required.

The file is loaded and checked as a whole when the app starts: a malformed row stops the start
with :class:`CatalogueError` naming the file and the row, and nothing is half-loaded.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

from service.referral.codes import CRITERION, LEVELS

COLUMNS = ("icd10", "name", "levels", "up_criteria", "down_criteria", "department_specialty", "rule", "note")
_REQUIRED = ("icd10", "name", "levels", "rule")
_ICD10 = re.compile(r"^[A-Z][0-9]{2}(\.[0-9A-Z]{1,4})?$")
_SNOMED = re.compile(r"^[0-9]{6,18}$")
_RULE = re.compile(r"^R[0-9]+[a-z]?$")


class CatalogueError(ValueError):
    """The catalogue file is malformed; the message names the file and the row."""


def normalize(code: str) -> str:
    """``I25.2`` → ``I252``: ICD-10 codes compare as prefixes without the dot."""
    return code.strip().upper().replace(".", "")


@dataclass(frozen=True)
class Entry:
    """One catalogue row."""

    row: int  # line number in the file (the header is line 1)
    code: str  # as written: I10, I25.2, I20-I25
    name: str
    levels: frozenset[str]
    up_criteria: tuple[str, ...]
    down_criteria: tuple[str, ...]
    department_specialty: str | None
    rule: str
    low: str  # normalised bounds; equal for a single code
    high: str

    @property
    def is_range(self) -> bool:
        return self.low != self.high

    @property
    def specificity(self) -> tuple[int, int]:
        return (len(self.low), 0 if self.is_range else 1)

    def covers(self, icd10: str) -> bool:
        code = normalize(icd10)
        head = code[: len(self.low)]
        return len(head) == len(self.low) and self.low <= head <= self.high

    @property
    def primary_treats(self) -> bool:
        return "primary" in self.levels

    @property
    def hospital_levels(self) -> frozenset[str]:
        return self.levels - {"primary"}


@dataclass(frozen=True)
class Catalogue:
    source: str
    entries: tuple[Entry, ...]

    def lookup(self, icd10: str) -> Entry | None:
        """The most specific row covering ``icd10`` (None: the condition is not catalogued)."""
        matches = [e for e in self.entries if e.covers(icd10)]
        return max(matches, key=lambda e: e.specificity) if matches else None


def criterion_codes(profiles_dir: Path) -> dict[str, str]:
    """criterion code → direction (up | down), from ``CodeSystem-yilian-referral-criterion.json``."""
    path = profiles_dir / "CodeSystem-yilian-referral-criterion.json"
    cs = json.loads(path.read_text(encoding="utf-8"))
    if cs.get("url") != CRITERION:
        raise CatalogueError(f"{path.name}: expected the CodeSystem {CRITERION}")
    out = {}
    for concept in cs.get("concept") or []:
        direction = next((p.get("valueCode") for p in concept.get("property") or [] if p.get("code") == "direction"),
                         None)
        out[concept["code"]] = direction or ""
    return out


def load_catalogue(path: Path, criteria: dict[str, str]) -> Catalogue:
    """Read and check the whole file; raise CatalogueError at the first bad row."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise CatalogueError(f"{path}: cannot read the referral catalogue: {exc}") from None
    reader = csv.DictReader(text.splitlines())
    header = tuple(reader.fieldnames or ())
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise CatalogueError(f"{path.name}: row 1 (header): missing column(s) {', '.join(missing)}; "
                             f"expected {','.join(COLUMNS)}")
    entries: list[Entry] = []
    for line, row in enumerate(reader, start=2):
        entries.append(_entry(path.name, line, row, criteria))
    if not entries:
        raise CatalogueError(f"{path.name}: the referral catalogue has no rows")
    _check_overlaps(path.name, entries)
    return Catalogue(path.name, tuple(entries))


def _entry(source: str, line: int, row: dict[str, str | None], criteria: dict[str, str]) -> Entry:
    where = f"{source}: row {line}"
    if None in row:  # more cells than columns
        raise CatalogueError(f"{where}: {len(row) - 1 + len(row[None] or [])} cells, but the header has "  # type: ignore[index]
                             f"{len(COLUMNS)} columns")
    cells = {k: (v or "").strip() for k, v in row.items()}
    for column in _REQUIRED:
        if not cells.get(column):
            raise CatalogueError(f"{where}: column {column} is empty")
    code = cells["icd10"]
    low_text, sep, high_text = code.partition("-")
    for part in (low_text, high_text) if sep else (low_text,):
        if not _ICD10.match(part.strip()):
            raise CatalogueError(f"{where}: icd10 {code!r} is not an ICD-10 code like I10, I25.2 or a range I20-I25")
    low, high = normalize(low_text), normalize(high_text if sep else low_text)
    if len(low) != len(high) or low > high:
        raise CatalogueError(f"{where}: icd10 range {code!r} must run upward between codes of the same length")
    levels = frozenset(_split(cells["levels"]))
    unknown = levels - set(LEVELS)
    if unknown or not levels:
        raise CatalogueError(f"{where}: levels {cells['levels']!r}: use {', '.join(LEVELS)} separated by ';'")
    up, down = _split(cells.get("up_criteria", "")), _split(cells.get("down_criteria", ""))
    for column, codes, direction in (("up_criteria", up, "up"), ("down_criteria", down, "down")):
        for criterion in codes:
            if criterion not in criteria:
                raise CatalogueError(f"{where}: {column} {criterion!r} is not a code of {CRITERION}")
            if criteria[criterion] not in ("", direction):
                raise CatalogueError(f"{where}: {column} {criterion!r} is a {criteria[criterion]} criterion")
    specialty = cells.get("department_specialty") or None
    if specialty and not _SNOMED.match(specialty):
        raise CatalogueError(f"{where}: department_specialty {specialty!r} is not a SNOMED CT code")
    rules = _split(cells["rule"])
    if not all(_RULE.match(r) for r in rules):
        raise CatalogueError(f"{where}: rule {cells['rule']!r} is not a rule id like R31")
    return Entry(line, code, cells["name"], levels, tuple(up), tuple(down), specialty, ";".join(rules), low, high)


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(";") if part.strip()]


def _check_overlaps(source: str, entries: list[Entry]) -> None:
    """Two rows that cover the same code with the same specificity would make lookup arbitrary."""
    seen: dict[tuple[str, str], Entry] = {}
    for entry in entries:
        key = (entry.low, entry.high)
        if key in seen:
            raise CatalogueError(f"{source}: row {entry.row}: {entry.code} repeats row {seen[key].row}")
        seen[key] = entry
    ranges = [e for e in entries if e.is_range]
    for i, a in enumerate(ranges):
        for b in ranges[i + 1:]:
            if len(a.low) == len(b.low) and a.low <= b.high and b.low <= a.high:
                raise CatalogueError(f"{source}: row {b.row}: range {b.code} overlaps row {a.row} ({a.code})")
