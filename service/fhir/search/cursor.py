"""Opaque keyset cursors for ``_cursor``.

A cursor is urlsafe base64 of a small JSON object: the snapshot sequence pinned by the first
page, the sort key of the row the page starts after (or before, for ``previous``), a
fingerprint of the search's sort order, so that a cursor pasted onto a different search is
rejected instead of silently skipping rows, and what the first page knew of the total (so
that later pages need not count again). Nothing in it is secret: it only positions a search
the caller may run anyway, and authorization is applied to every page; a total edited in a
cursor changes only the number its editor is shown.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Sequence
from datetime import datetime

import orjson

from service.fhir.errors import BadRequest
from service.fhir.search.model import LAST_UPDATED_TYPE, Cursor, KnownTotal, SortSpec

_VERSION = 1


def fingerprint(resource_type: str, sort: Sequence[SortSpec]) -> str:
    text = resource_type + "|" + ",".join(f"{'-' if s.descending else ''}{s.code}" for s in sort)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def encode(cursor: Cursor, fp: str) -> str:
    key = [v.isoformat() if isinstance(v, datetime) else v for v in cursor.key]
    payload = {"v": _VERSION, "s": cursor.snapshot, "k": key, "f": fp}
    if cursor.backward:
        payload["b"] = 1
    if cursor.total is not None:
        payload["t"] = [cursor.total.kind, cursor.total.value]
    return base64.urlsafe_b64encode(orjson.dumps(payload)).rstrip(b"=").decode("ascii")


def decode(raw: str, fp: str) -> Cursor:
    """Parse a cursor; its key values are converted back with :func:`restore_key`."""
    try:
        padded = raw + "=" * (-len(raw) % 4)
        payload = orjson.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
        if not isinstance(payload, dict) or payload.get("v") != _VERSION:
            raise TypeError("not a version 1 cursor")
        snapshot = int(payload["s"])
        key = payload["k"]
        if not isinstance(key, list):
            raise TypeError("key")
        total = _known_total(payload.get("t"))
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeError, orjson.JSONDecodeError):
        raise BadRequest("Invalid _cursor: use the next/previous links of a search result", expression="_cursor") from None
    if payload.get("f") != fp:
        raise BadRequest("_cursor belongs to a different search (resource type or _sort changed)",
                         expression="_cursor")
    return Cursor(snapshot, tuple(key), bool(payload.get("b")), total)


def _known_total(raw: object) -> KnownTotal | None:
    if raw is None:
        return None
    if (not isinstance(raw, list) or len(raw) != 2 or raw[0] not in KnownTotal.KINDS
            or type(raw[1]) is not int or raw[1] < 0):
        raise TypeError("total")
    return KnownTotal(raw[0], raw[1])


def restore_key(key: tuple, sort_types: Sequence[str]) -> tuple:
    """Turn JSON key values back into what the database compares (datetimes for _lastUpdated)."""
    if len(key) != len(sort_types):
        raise BadRequest("Invalid _cursor: it does not match this search's sort order", expression="_cursor")
    out = []
    for value, kind in zip(key, sort_types):
        if kind == LAST_UPDATED_TYPE and isinstance(value, str):
            try:
                value = datetime.fromisoformat(value)
            except ValueError:
                raise BadRequest("Invalid _cursor", expression="_cursor") from None
        out.append(value)
    return tuple(out)
