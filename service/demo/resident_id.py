"""Resident identity card numbers (居民身份证号码, GB 11643-1999).

The demo data must carry IDs that real validators accept, because the gateway identifies
residents by this number (domain.md, "Actors") and refuses bad ones on write
(``service.security.resident_id``, whose check character this module reuses). Layout of the 18 characters::

    AAAAAA YYYYMMDD SSS C
    area   birth    seq check

- ``AAAAAA`` administrative-division code (GB/T 2260) of the place of registration;
- ``YYYYMMDD`` date of birth;
- ``SSS`` order code among people with the same area and birth date; its last digit is odd
  for men and even for women;
- ``C`` the ISO 7064 MOD 11-2 check character over the first 17 digits.
"""

from __future__ import annotations

from datetime import date

# The check character and validation live with the write-time check (service.security), so the
# demo data and the server agree by construction.
from service.security.resident_id import CHECK_CHARACTERS, SYSTEM, WEIGHTS, check_character, is_valid

__all__ = ["CHECK_CHARACTERS", "SYSTEM", "WEIGHTS", "birth_date_of", "check_character", "is_valid",
           "make_resident_id", "order_code", "sex_of"]


def order_code(seq: int, sex: str) -> str:
    """The 3-digit order code for the ``seq``-th person (1..499) of the given sex.

    Men get odd codes (001, 003, ... 997), women even ones (002, 004, ... 998), so ``seq``
    counts people of one sex born on one day in one area.
    """
    if not 1 <= seq <= 499:
        raise ValueError(f"seq must be within 1..499, got {seq}")
    if sex == "male":
        return f"{2 * seq - 1:03d}"
    if sex == "female":
        return f"{2 * seq:03d}"
    raise ValueError(f"sex must be 'male' or 'female', got {sex!r}")


def make_resident_id(area: str, birth: date, seq: int, sex: str) -> str:
    """Build a valid 18-character resident ID.

    ``area`` is a 6-digit division code, ``seq`` 1..499 (see :func:`order_code`) and
    ``sex`` the FHIR ``Patient.gender`` value ``male`` or ``female``.
    """
    if len(area) != 6 or not area.isascii() or not area.isdigit():
        raise ValueError(f"area must be 6 digits, got {area!r}")
    first17 = f"{area}{birth:%Y%m%d}{order_code(seq, sex)}"
    return first17 + check_character(first17)


def sex_of(resident_id: str) -> str:
    """``male`` or ``female`` from the parity of the 17th character."""
    return "male" if int(resident_id[16]) % 2 else "female"


def birth_date_of(resident_id: str) -> date:
    """The date of birth encoded in characters 7-14."""
    return date(int(resident_id[6:10]), int(resident_id[10:12]), int(resident_id[12:14]))
