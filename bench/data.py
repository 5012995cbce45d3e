"""Synthetic data for the benchmark: Chinese Patients, transaction Bundles, request lists.

Deterministic: everything random comes from one ``random.Random(seed)``, so two runs load
the same people (only the server-assigned ids differ). Names repeat, as they do in a real
city of 10,000 residents (the demo generator refuses repeats and so cannot make that many);
resident IDs never repeat and always carry a valid GB 11643 check character.
"""

from __future__ import annotations

import random
import re
import uuid
from collections.abc import Iterable, Iterator, Sequence
from datetime import date, timedelta
from typing import Any
from urllib.parse import quote

from service.demo.alliance import CITY, CLINICS, DISTRICTS, POSTAL_CODE, PROVINCE
from service.demo.names import (
    FAMILY_NAMES,
    GENERATION_SPLIT_YEAR,
    GIVEN_FEMALE_OLDER,
    GIVEN_FEMALE_YOUNGER,
    GIVEN_MALE_OLDER,
    GIVEN_MALE_YOUNGER,
    MOBILE_PREFIXES,
)
from service.demo.resident_id import SYSTEM as RESIDENT_ID_SYSTEM
from service.demo.resident_id import birth_date_of, make_resident_id

Resource = dict[str, Any]

DEFAULT_SEED = 20261122
#: Every benchmark patient is a contracted resident of this demo clinic (its managingOrganization),
#: and with authorization on the benchmark calls as the clinic's demo client: so every patient is
#: visible to the caller, as a clinic's own residents are. ``yilian demo-data`` creates both.
CLINIC_KEY = "shangzhan"
CLINIC_REFERENCE = f"Organization/clinic-yq-{CLINIC_KEY}"
DEMO_CLIENT = f"demo-clinic-{CLINIC_KEY}"
INSURANCE_SYSTEM = "https://yilian.example.org/fhir/sid/medical-insurance"
#: Placeholders in request-body templates; bench/lua/post.lua replaces each occurrence with
#: a fresh valid resident ID of that sex (area 110105, never used by the loaded patients).
RID_PLACEHOLDER = {"male": "@@RID:male@@", "female": "@@RID:female@@"}
#: ... and each of these the birth date of the resident ID filled just before it.
BIRTH_PLACEHOLDER = "@@BIRTH@@"
_PLACEHOLDER = re.compile(r"@@(RID:male|RID:female|BIRTH)@@")
FIRST_BIRTH, LAST_BIRTH = date(1936, 1, 1), date(2025, 12, 31)

_GIVEN = {
    ("male", True): GIVEN_MALE_OLDER, ("female", True): GIVEN_FEMALE_OLDER,
    ("male", False): GIVEN_MALE_YOUNGER, ("female", False): GIVEN_FEMALE_YOUNGER,
}
_FAMILIES = [f for f, _ in FAMILY_NAMES]
_FAMILY_WEIGHTS = [w for _, w in FAMILY_NAMES]


class PatientFactory:
    """Draws Patients from one seeded ``random.Random``; resident IDs are unique per factory."""

    def __init__(self, seed: int = DEFAULT_SEED) -> None:
        self.rng = random.Random(seed)
        self.clinic = next(c for c in CLINICS if c.key == CLINIC_KEY)
        self._resident_ids: set[str] = set()
        self._span = (LAST_BIRTH - FIRST_BIRTH).days

    def patient(self, *, resident_id: str | None = None, sex: str | None = None) -> Resource:
        rng = self.rng
        sex = sex or rng.choice(("male", "female"))
        birth = FIRST_BIRTH + timedelta(days=rng.randrange(self._span + 1))
        clinic = self.clinic
        district = DISTRICTS[clinic.district]
        if resident_id is None:
            resident_id = self._unique_resident_id(district.code, birth, sex)
        family = rng.choices(_FAMILIES, _FAMILY_WEIGHTS)[0]
        given = rng.choice(_GIVEN[(sex, birth.year < GENERATION_SPLIT_YEAR)])
        street = rng.choice(clinic.streets)
        if clinic.rural:
            line = f"{street}{rng.randint(1, 180)}号"
        else:
            line = (f"{street}{rng.randint(1, 300)}号{rng.randint(1, 12)}号楼{rng.randint(1, 4)}单元"
                    f"{rng.randint(1, 6)}0{rng.randint(1, 4)}室")
        address: Resource = {
            "use": "home", "type": "physical", "text": f"{PROVINCE}{CITY}{district.name}{line}",
            "line": [line], "city": CITY, "district": district.name, "state": PROVINCE, "country": "CN",
        }
        if not clinic.rural:
            address["postalCode"] = POSTAL_CODE
        return {
            "resourceType": "Patient",
            "identifier": [
                {"use": "official", "type": {"text": "居民身份证"}, "system": RESIDENT_ID_SYSTEM,
                 "value": resident_id},
                {"use": "secondary", "type": {"text": "医保编号"}, "system": INSURANCE_SYSTEM,
                 "value": f"{district.code[:4]}{rng.randrange(10**11, 10**12)}"},
            ],
            "active": True,
            "name": [{"use": "official", "text": family + given, "family": family, "given": [given]}],
            "telecom": [{"system": "phone", "use": "mobile",
                         "value": "1" + rng.choice(MOBILE_PREFIXES) + f"{rng.randrange(10**8):08d}"}],
            "gender": sex,
            "birthDate": birth.isoformat(),
            "address": [address],
            "managingOrganization": {"reference": CLINIC_REFERENCE, "display": clinic.name},
        }

    def patients(self, count: int) -> list[Resource]:
        return [self.patient() for _ in range(count)]

    def template(self, sex: str | None = None) -> Resource:
        """A Patient whose resident ID is the placeholder that the Lua script fills per request."""
        sex = sex or self.rng.choice(("male", "female"))
        patient = self.patient(resident_id=RID_PLACEHOLDER[sex], sex=sex)
        patient["birthDate"] = BIRTH_PLACEHOLDER
        return patient

    def resident_id(self, area: str, sex: str) -> str:
        """A fresh resident ID of that area and sex, with a random birth date."""
        return self._unique_resident_id(area, FIRST_BIRTH + timedelta(days=self.rng.randrange(self._span + 1)), sex)

    def _unique_resident_id(self, area: str, birth: date, sex: str) -> str:
        for _ in range(1000):
            candidate = make_resident_id(area, birth, self.rng.randint(1, 499), sex)
            if candidate not in self._resident_ids:
                self._resident_ids.add(candidate)
                return candidate
        raise RuntimeError(f"no free resident ID left for {area} {birth:%Y-%m-%d}")


def fill_placeholders(text: str, factory: PatientFactory, *, area: str = "110105") -> str:
    """What bench/lua/post.lua does to a template, in Python (smoke checks, warm-up, tests)."""
    last: list[str] = []

    def fill(match: re.Match[str]) -> str:
        if match.group(1) == "BIRTH":
            return birth_date_of(last[-1]).isoformat()
        last.append(factory.resident_id(area, match.group(1).split(":")[1]))
        return last[-1]

    return _PLACEHOLDER.sub(fill, text)


def transaction_bundle(resources: Sequence[Resource], *, rng: random.Random | None = None) -> Resource:
    """A transaction Bundle POSTing every resource (``urn:uuid`` fullUrls, server-assigned ids)."""
    rng = rng or random.Random(0)
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": f"urn:uuid:{uuid.UUID(int=rng.getrandbits(128), version=4)}",
             "resource": resource,
             "request": {"method": "POST", "url": resource["resourceType"]}}
            for resource in resources
        ],
    }


def chunked(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    if size < 1:
        raise ValueError("size must be at least 1")
    for start in range(0, len(items), size):
        yield items[start:start + size]


def created_ids(response_bundle: Resource) -> list[str]:
    """Ids of the resources a transaction-response created (from ``entry.response.location``)."""
    ids = []
    for entry in response_bundle.get("entry", []):
        response = entry.get("response", {})
        if not str(response.get("status", "")).startswith("201"):
            raise ValueError(f"transaction entry answered {response.get('status')!r}, not 201")
        # "Patient/<id>/_history/1", possibly absolute
        parts = response["location"].split("/_history/")[0].rstrip("/").split("/")
        ids.append(parts[-1])
    return ids


def resident_id_of(patient: Resource) -> str:
    return next(i["value"] for i in patient["identifier"] if i["system"] == RESIDENT_ID_SYSTEM)


def name_prefixes(patients: Sequence[Resource], count: int, *, seed: int = DEFAULT_SEED) -> list[str]:
    """``count`` name prefixes drawn from the patients (so as frequent as the names are):
    half the leading character of the full name (the family name, mostly), half the leading two."""
    rng = random.Random(seed)
    prefixes = []
    for i in range(count):
        text = rng.choice(patients)["name"][0]["text"]
        prefixes.append(text[: 1 + i % 2])
    return prefixes


# -- request paths, one per line in the files the Lua scripts read ---------------------------

def floor_paths(ids: Iterable[str]) -> list[str]:
    return [f"/bench/floor/Patient/{quote(i, safe='')}" for i in ids]


def read_paths(ids: Iterable[str]) -> list[str]:
    return [f"/fhir/Patient/{quote(i, safe='')}" for i in ids]


def identifier_paths(resident_ids: Iterable[str]) -> list[str]:
    return [f"/fhir/Patient?identifier={quote(f'{RESIDENT_ID_SYSTEM}|{rid}', safe='')}" for rid in resident_ids]


def name_paths(prefixes: Iterable[str]) -> list[str]:
    return [f"/fhir/Patient?name={quote(p, safe='')}" for p in prefixes]
