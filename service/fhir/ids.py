"""Server-assigned resource ids: UUIDv7 (RFC 9562) as 32 lowercase hex digits.

A random id (UUIDv4) lands each new resource at a random place in every b-tree keyed by
id (the resource and version keys, the owner index of each index table, the targets of
references to it): each write touches a different leaf page, and after a checkpoint each
page's first change writes a full page image to the WAL. Ids that grow with time append
next to the previous write instead. The 74 random bits keep ids unguessable; the first 48
bits are the creation time in milliseconds, which ``meta.lastUpdated`` of version 1 shows
anyway.
"""

from __future__ import annotations

import os
import time

_VERSION = 0x7 << 76  # bits 48-51 of the 128
_VARIANT = 0b10 << 62  # bits 64-65
_RAND_A = 0xFFF << 64  # the 12 bits after the version
_RAND_B = (1 << 62) - 1  # the 62 bits after the variant


def new_id() -> str:
    """A fresh UUIDv7 as 32 hex digits (a valid FHIR id, the same shape as ``uuid4().hex``)."""
    millis = time.time_ns() // 1_000_000
    random = int.from_bytes(os.urandom(10), "big")
    value = (millis << 80) | _VERSION | (random & _RAND_A) | _VARIANT | (random & _RAND_B)
    return f"{value:032x}"
