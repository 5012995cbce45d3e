"""Resident IDs leave the server masked unless the caller may see them in full.

``110105195803070017`` is sent as ``110105********0017`` (area code and last four kept) to
every caller without :data:`FULL_VIEW_SCOPE`. Masking happens in one place, where JSON
leaves the server (``service.security.audit.PrivacyMiddleware`` calls :func:`mask_body` on
every FHIR response: read, vread, search matches and includes, history, batch/transaction
responses, write echoes, errors). The stored data is never changed.

Fast paths: a caller who may see IDs costs nothing (the body is not looked at); for the
others a body without the resident-ID system URI costs one substring search. Only bodies that
carry resident IDs are parsed.

Logs never carry them either: :class:`ResidentIdLogFilter` masks anything shaped like a
resident ID in log records (uvicorn's access log prints query strings).
"""

from __future__ import annotations

import logging
import re
from typing import Any

import orjson

from service.fhir.access import AccessContext
from service.security.resident_id import SYSTEM, mask

#: The SMART-style scope that lets a client see resident IDs unmasked. ``system/`` scopes that
#: read Patient (``system/Patient.read``, ``system/Patient.rs``, ``system/*.read`` ...) also do:
#: they are backend integrations (the HIS, the insurance bureau) that match on the number.
FULL_VIEW_SCOPE = "yilian/resident-id.read"

_MARKER = SYSTEM.encode()
_SYSTEM_SCOPE = re.compile(r"^system/(Patient|\*)\.(read|\*|c?r[uds]*)$")
#: Anything shaped like a resident ID inside free text (log lines, queries, diagnostics).
#: Also right after a percent-encoded delimiter (``...%7C110105...`` in a logged query string).
_ID_IN_TEXT = re.compile(r"(?:(?<=%[0-9A-Fa-f]{2})|(?<![0-9A-Za-z]))(\d{17}[\dXx])(?![0-9A-Za-z])")


def may_see_resident_ids(ctx: AccessContext | None, *, unrestricted: bool = False) -> bool:
    """Whether responses to ``ctx`` carry resident IDs in full. ``unrestricted`` is a caller the
    boundary policy does not restrict (development mode without authentication)."""
    if ctx is None:
        return False
    if ctx.system or unrestricted:
        return True
    return any(scope == FULL_VIEW_SCOPE or _SYSTEM_SCOPE.match(scope) for scope in ctx.scopes)


def mask_text(text: str) -> str:
    """Mask every resident-ID-shaped token in free text."""
    return _ID_IN_TEXT.sub(lambda m: mask(m.group(1)), text)


def mask_body(body: bytes) -> bytes:
    """The JSON body with every resident ID masked (identifiers of that system at any depth:
    resources, contained resources, Bundle entries, logical references); other occurrences of
    the same numbers (narrative, links, diagnostics) are masked too."""
    if _MARKER not in body:
        return body
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return mask_text(body.decode("utf-8", "replace")).encode()
    found: set[str] = set()
    _mask_identifiers(document, found)
    out = orjson.dumps(document)
    for value in found:
        if len(value) >= 15:  # long enough never to collide with unrelated text
            out = out.replace(value.encode(), mask(value).encode())
    if isinstance(document, dict) and document.get("resourceType") == "OperationOutcome":
        out = mask_text(out.decode()).encode()  # diagnostics may quote a conditional query
    return out


def _mask_identifiers(node: Any, found: set[str]) -> None:
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if item.get("system") == SYSTEM and isinstance(item.get("value"), str):
                found.add(item["value"])
                item["value"] = mask(item["value"])
            stack.extend(v for v in item.values() if isinstance(v, (dict, list)))
        elif isinstance(item, list):
            stack.extend(v for v in item if isinstance(v, (dict, list)))


class ResidentIdLogFilter(logging.Filter):
    """Masks resident IDs in log records, keeping the record's shape (uvicorn's access
    formatter unpacks ``record.args``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = mask_text(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(mask_text(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: mask_text(v) if isinstance(v, str) else v for k, v in record.args.items()}
        return True


_LOGGERS = ("uvicorn.access", "uvicorn.error", "uvicorn", "yilian", "yilian.api", "")


def install_log_filter() -> None:
    """Attach the filter to the loggers that may print request lines or resources, and to the
    root handlers (records of child loggers pass through those)."""
    log_filter = ResidentIdLogFilter()
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, ResidentIdLogFilter) for f in logger.filters):
            logger.addFilter(log_filter)
        for handler in logger.handlers:
            if not any(isinstance(f, ResidentIdLogFilter) for f in handler.filters):
                handler.addFilter(log_filter)
