"""Parsing of search parameter *values*: escaping, OR lists, prefixes, typed values.

Every malformed value raises :class:`BadRequest` naming the parameter, so a client learns
which part of its query was wrong rather than getting an empty or surprising result.
"""

from __future__ import annotations

import re

from service.fhir.errors import BadRequest
from service.fhir.search.model import (
    PREFIXES,
    DateValue,
    NumberValue,
    QuantityValue,
    ReferenceValue,
    TextValue,
    TokenValue,
    UriValue,
)

_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
# A zone offset whose '+' was decoded as a space by form-style query parsing.
_SPACE_OFFSET = re.compile(r" (\d{2}:?\d{2})$")
_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_TYPE = re.compile(r"^[A-Z][A-Za-z]+$")


def split_escaped(text: str, sep: str) -> list[str]:
    """Split on ``sep`` unless it is escaped with a backslash; escapes are kept in the parts."""
    parts: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            current.append(text[i : i + 2])
            i += 2
            continue
        if ch == sep:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    parts.append("".join(current))
    return parts


def unescape(text: str) -> str:
    r"""Undo search escaping: ``\,`` ``\|`` ``\$`` ``\\`` stand for the character itself."""
    if "\\" not in text:
        return text
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            out.append(text[i + 1])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def or_values(raw: str) -> list[str]:
    """The comma-separated alternatives of a value, still escaped (each type splits further)."""
    return split_escaped(raw, ",")


def _bad(name: str, message: str) -> BadRequest:
    return BadRequest(f"Invalid value for search parameter '{name}': {message}", expression=name)


def split_prefix(name: str, raw: str) -> tuple[str, str]:
    """``ge2020`` → (``ge``, ``2020``). A value starting with two letters must use a known prefix."""
    if len(raw) >= 2 and raw[:2].isalpha():
        prefix = raw[:2]
        if prefix not in PREFIXES:
            raise _bad(name, f"unknown prefix '{prefix}' in '{raw}' (use one of {', '.join(PREFIXES)})")
        return prefix, raw[2:]
    return "eq", raw


def _clip(text: str, limit: int) -> str:
    """Search values are cut exactly as the indexer cuts stored values, so long ones still match."""
    return text if len(text) <= limit else text[:limit]


def parse_token(name: str, raw: str) -> TokenValue:
    from service.fhir.indexing import MAX_VALUE_CHARS

    parts = split_escaped(raw, "|")
    if len(parts) == 1:
        code = _clip(unescape(parts[0]), MAX_VALUE_CHARS)
        if code == "":
            raise _bad(name, "empty token")
        return TokenValue(None, code)
    if len(parts) == 2:
        system, code = _clip(unescape(parts[0]), MAX_VALUE_CHARS), _clip(unescape(parts[1]), MAX_VALUE_CHARS)
        if system == "" and code == "":
            raise _bad(name, "'|' alone is not a token")
        return TokenValue(system, code or None)
    raise _bad(name, f"'{raw}' has more than one unescaped '|' (expected [system]|[code])")


def parse_text(name: str, raw: str) -> TextValue:
    from service.fhir.indexing import MAX_STRING_CHARS, normalize_string

    text = _clip(unescape(raw), MAX_STRING_CHARS)
    return TextValue(text, normalize_string(text))


def parse_date(name: str, raw: str) -> DateValue:
    from service.fhir.indexing import date_range

    prefix, rest = split_prefix(name, raw)
    rest = _SPACE_OFFSET.sub(r"+\1", unescape(rest).strip())
    if not rest or not rest[:4].isdigit():
        raise _bad(name, f"'{raw}' is not a date (expected [prefix]YYYY[-MM[-DD[Thh:mm[:ss[.sss]][zone]]]])")
    try:
        low, high = date_range(rest)
    except (ValueError, TypeError, OverflowError) as exc:
        raise _bad(name, f"'{raw}' is not a valid date: {exc}") from None
    return DateValue(prefix, int(low), int(high))


def _number(name: str, raw: str, text: str) -> tuple[float, float, float]:
    from service.fhir.indexing import number_range

    if not _NUMBER.match(text):
        raise _bad(name, f"'{raw}' is not a number")
    try:
        low, high = number_range(text)
    except (ValueError, TypeError, ArithmeticError) as exc:
        raise _bad(name, f"'{raw}' is not a valid number: {exc}") from None
    return float(text), float(low), float(high)


def parse_number(name: str, raw: str) -> NumberValue:
    prefix, rest = split_prefix(name, raw)
    value, low, high = _number(name, raw, unescape(rest).strip())
    return NumberValue(prefix, value, low, high)


def parse_quantity(name: str, raw: str) -> QuantityValue:
    parts = split_escaped(raw, "|")
    if len(parts) not in (1, 3):
        raise _bad(name, f"'{raw}' is not [prefix]number|system|code or [prefix]number")
    prefix, rest = split_prefix(name, parts[0])
    value, low, high = _number(name, raw, unescape(rest).strip())
    system = code = None
    if len(parts) == 3:
        system = unescape(parts[1]) or None
        code = unescape(parts[2]) or None
    return QuantityValue(prefix, value, low, high, system, code)


def parse_reference(name: str, raw: str, *, type_modifier: str | None, targets: tuple[str, ...],
                    base_url: str | None) -> ReferenceValue:
    """``Type/id``, ``id`` (typed by ``:Type`` or a single-target parameter) or an absolute URL.

    An absolute URL under our own ``base_url`` is the same as the relative reference; any other
    absolute URL (or canonical) matches the stored ``url`` exactly.
    """
    value = unescape(raw).strip()
    if not value:
        raise _bad(name, "empty reference")
    if base_url and value.startswith(base_url.rstrip("/") + "/"):
        value = value[len(base_url.rstrip("/")) + 1 :]
    if "://" in value or value.startswith("urn:"):
        from service.fhir.indexing import MAX_VALUE_CHARS

        return ReferenceValue(None, None, _clip(value, MAX_VALUE_CHARS))
    parts = value.split("/")
    if len(parts) == 1:
        target_type = type_modifier or (targets[0] if len(targets) == 1 else None)
        return ReferenceValue(target_type, parts[0])
    if len(parts) in (2, 4) and _TYPE.match(parts[0]) and (len(parts) == 2 or parts[2] == "_history"):
        if type_modifier and parts[0] != type_modifier:
            raise _bad(name, f"'{value}' is not a {type_modifier} reference")
        return ReferenceValue(parts[0], parts[1])
    raise _bad(name, f"'{raw}' is not a reference (expected [Type/]id or an absolute URL)")


def parse_uri(name: str, raw: str) -> UriValue:
    from service.fhir.indexing import MAX_VALUE_CHARS

    value = _clip(unescape(raw), MAX_VALUE_CHARS)
    if not value:
        raise _bad(name, "empty uri")
    return UriValue(value)


def parse_bool(name: str, raw: str) -> bool:
    if raw in ("true", "false"):
        return raw == "true"
    raise _bad(name, f"'{raw}' must be true or false")


def valid_id(value: str) -> bool:
    return bool(_ID.match(value))
