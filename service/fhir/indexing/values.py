"""Turn values found by a search expression into index rows, one converter per parameter type.

Each converter receives the parameter code, the FHIR type of the value (``None`` when the
expression fell back to FHIRPath and the type is unknown: then it is guessed from the JSON
shape) and the value itself, and appends plain tuples to a ``Collector``. Tuples, not dicts, so
that de-duplication is a cheap ``dict.fromkeys`` and building rows stays off the hot path.

Converters never raise on odd data: a value of a type a parameter cannot index (a SampledData
for a quantity parameter, say) is skipped, as HAPI does.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from service.fhir.indexing.dates import DATE_MAX, DATE_MIN, date_range
from service.fhir.indexing.model import RESOURCE_TYPES
from service.fhir.indexing.numbers import number_range, number_text
from service.fhir.indexing.text import MAX_STRING_CHARS, MAX_VALUE_CHARS, normalize_string

#: Bounds standing in for a Range's missing low/high in number and quantity rows.
NUMBER_MIN = -sys.float_info.max
NUMBER_MAX = sys.float_info.max

#: Token rows for ``Reference.identifier`` go under ``<code>:identifier``.
IDENTIFIER_SUFFIX = ":identifier"

ISO_4217 = "urn:iso:std:iso:4217"

_QUANTITY_TYPES = frozenset({"Quantity", "Age", "Duration", "Distance", "Count", "SimpleQuantity", "MoneyQuantity"})
_TOKEN_PRIMITIVES = frozenset(
    {"code", "string", "id", "uri", "url", "canonical", "oid", "uuid", "markdown", "integer",
     "positiveInt", "unsignedInt", "decimal"}
)
_CONTACT_SYSTEMS = frozenset({"phone", "fax", "email", "pager", "url", "sms", "other"})


class Collector:
    """Rows of one resource as tuples, in table column order (param first)."""

    __slots__ = ("tokens", "strings", "dates", "references", "numbers", "quantities", "uris")

    def __init__(self) -> None:
        self.tokens: list[tuple[str, str, str | None, str | None]] = []
        self.strings: list[tuple[str, str, str]] = []
        self.dates: list[tuple[str, int, int]] = []
        self.references: list[tuple[str, str | None, str | None, str | None]] = []
        self.numbers: list[tuple[str, float, float, float]] = []
        self.quantities: list[tuple[str, float, float, float, str, str | None]] = []
        self.uris: list[tuple[str, str]] = []


Converter = Callable[[Collector, str, "str | None", Any], None]


def _clip(s: str, n: int = MAX_VALUE_CHARS) -> str:
    return s if len(s) <= n else s[:n]


def _text(v: Any) -> str | None:
    return v if isinstance(v, str) and v else None


def guess_type(value: Any) -> str | None:
    """The FHIR datatype a JSON value most likely is, for FHIRPath fallback results."""
    t = type(value)
    if t is bool:
        return "boolean"
    if t is str:
        return "string"
    if t in (int, float) or t is Decimal:
        return "decimal"
    if t is not dict:
        return "string" if value is not None else None  # fhirpathpy date/time/quantity objects
    keys = value.keys()
    if "resourceType" in keys:
        return "Resource"
    if "coding" in keys:
        return "CodeableConcept"
    if "reference" in keys:
        return "Reference"
    if "family" in keys or "given" in keys:
        return "HumanName"
    if keys & {"line", "city", "district", "state", "postalCode", "country"}:
        return "Address"
    if "start" in keys or "end" in keys:
        return "Period"
    if "event" in keys or "repeat" in keys:
        return "Timing"
    if "low" in keys or "high" in keys:
        return "Range"
    if "currency" in keys:
        return "Money"
    if "value" in keys:
        if type(value["value"]) in (int, float) or type(value["value"]) is Decimal:
            return "Quantity"
        if value.get("system") in _CONTACT_SYSTEMS or "rank" in keys:
            return "ContactPoint"
        return "Identifier"
    if "identifier" in keys:
        return "Reference"
    if "code" in keys or "system" in keys or "display" in keys:
        return "Coding"
    if "text" in keys:
        return "CodeableConcept"
    return None


# --- token ----------------------------------------------------------------------------------


def _coding_row(c: Collector, param: str, coding: Any, fallback_text: str | None) -> None:
    if type(coding) is not dict:
        return
    system = _text(coding.get("system")) or ""
    code = _text(coding.get("code"))
    display = _text(coding.get("display")) or fallback_text
    if code is None and not system and display is None:
        return
    c.tokens.append(
        (param, _clip(system), _clip(code) if code else None, normalize_string(_clip(display, MAX_STRING_CHARS)) if display else None)
    )


def token(c: Collector, param: str, fhir_type: str | None, v: Any) -> None:
    """Identifier, Coding, CodeableConcept, ContactPoint, boolean and code-like primitives."""
    if fhir_type is None:
        fhir_type = guess_type(v)
    if type(v) is dict:
        if fhir_type == "CodeableConcept":
            codings = v.get("coding")
            if type(codings) is list:
                for coding in codings:
                    _coding_row(c, param, coding, None)
            text = _text(v.get("text"))
            if text:  # CodeableConcept.text is matched by :text, on a row of its own
                c.tokens.append((param, "", None, normalize_string(_clip(text, MAX_STRING_CHARS))))
        elif fhir_type == "Coding":
            _coding_row(c, param, v, None)
        elif fhir_type == "Identifier":
            system = _text(v.get("system")) or ""
            value = _text(v.get("value"))
            if value is None and not system:
                return
            t = v.get("type")
            label = None
            if type(t) is dict:
                label = _text(t.get("text"))
                if label is None and type(t.get("coding")) is list and t["coding"] and type(t["coding"][0]) is dict:
                    label = _text(t["coding"][0].get("display"))
            c.tokens.append(
                (param, _clip(system), _clip(value) if value else None,
                 normalize_string(_clip(label, MAX_STRING_CHARS)) if label else None)
            )
        elif fhir_type == "ContactPoint":
            value = _text(v.get("value"))
            if value:
                c.tokens.append((param, "", _clip(value), None))
        return
    if type(v) is bool:
        c.tokens.append((param, "", "true" if v else "false", None))
    elif type(v) is str:
        if v:
            c.tokens.append((param, "", _clip(v), None))
    elif fhir_type in _TOKEN_PRIMITIVES and v is not None:
        c.tokens.append((param, "", _clip(str(v)), None))


# --- string ---------------------------------------------------------------------------------

#: The parts of a HumanName / Address that are each a row of a string parameter over it.
NAME_PARTS = ("family", "given", "prefix", "suffix", "text")
ADDRESS_PARTS = ("line", "city", "district", "state", "postalCode", "country", "text")


def _string_row(c: Collector, param: str, s: Any) -> None:
    if type(s) is str and s:
        exact = s if len(s) <= MAX_STRING_CHARS else s[:MAX_STRING_CHARS]
        c.strings.append((param, normalize_string(exact), exact))


def string_converter(name_parts: tuple[str, ...] = NAME_PARTS,
                     address_parts: tuple[str, ...] = ADDRESS_PARTS) -> Converter:
    """The string converter, writing a row for the given parts of names and addresses (a
    parameter leaves out the parts another parameter indexes already: ``searchparams``)."""

    def string(c: Collector, param: str, fhir_type: str | None, v: Any) -> None:
        """string/markdown primitives; every part of a HumanName or Address is its own row."""
        if type(v) is str:
            _string_row(c, param, v)
            return
        if type(v) is not dict:
            return
        if fhir_type is None:
            fhir_type = guess_type(v)
        parts = name_parts if fhir_type == "HumanName" else address_parts if fhir_type == "Address" else ()
        for part in parts:
            x = v.get(part)
            if type(x) is list:
                for item in x:
                    _string_row(c, param, item)
            else:
                _string_row(c, param, x)

    return string


string = string_converter()


# --- date -----------------------------------------------------------------------------------


def _date_row(c: Collector, param: str, s: Any) -> None:
    try:
        low, high = date_range(s if type(s) is str else str(s))
    except ValueError:
        return
    c.dates.append((param, low, high))


def date(c: Collector, param: str, fhir_type: str | None, v: Any) -> None:
    """date/dateTime/instant at their precision; Period with open ends; Timing events."""
    if type(v) is not dict:
        if v is not None and type(v) is not bool:
            _date_row(c, param, v)
        return
    if fhir_type is None:
        fhir_type = guess_type(v)
    if fhir_type == "Period":
        start, end = v.get("start"), v.get("end")
        try:
            low = date_range(start)[0] if start else DATE_MIN
            high = date_range(end)[1] if end else DATE_MAX
        except (ValueError, TypeError):
            return
        if start or end:
            c.dates.append((param, low, high))
    elif fhir_type == "Timing":
        events = v.get("event")
        if type(events) is list:
            for e in events:
                _date_row(c, param, e)


# --- reference ------------------------------------------------------------------------------

_ID = r"[A-Za-z0-9\-.]{1,64}"
_RELATIVE = re.compile(rf"^([A-Z][A-Za-z]+)/({_ID})(?:/_history/[^/]+)?$")
_ABSOLUTE_TAIL = re.compile(rf"/([A-Z][A-Za-z]+)/({_ID})(/_history/[^/]+)?$")


def reference_row(literal: str) -> tuple[str | None, str | None, str | None]:
    """(target_type, target_id, url) for a literal reference.

    ``Patient/1`` and ``Patient/1/_history/2`` are local: type and id, no url. An absolute URL
    keeps its url (minus any ``/_history/v``) and also gets type/id when it ends in
    ``Type/id``. ``urn:uuid:`` and other references keep only the url.
    """
    m = _RELATIVE.match(literal)
    if m and m.group(1) in RESOURCE_TYPES:
        return m.group(1), m.group(2), None
    m = _ABSOLUTE_TAIL.search(literal)
    if m and m.group(1) in RESOURCE_TYPES and ":" in literal:
        url = literal[: m.start(3)] if m.group(3) else literal
        return m.group(1), m.group(2), _clip(url)
    return None, None, _clip(literal)


def reference(c: Collector, param: str, fhir_type: str | None, v: Any) -> None:
    """Reference (literal and identifier), canonical/uri strings, and whole resources
    (``Bundle.entry[0].resource``)."""
    if type(v) is str:  # canonical / uri: matched by url; also unversioned when "url|version"
        if v:
            c.references.append((param, None, None, _clip(v)))
            if "|" in v:
                c.references.append((param, None, None, _clip(v.split("|", 1)[0])))
        return
    if type(v) is not dict:
        return
    if fhir_type is None:
        fhir_type = guess_type(v)
    if fhir_type == "Resource" or (fhir_type in RESOURCE_TYPES and "resourceType" in v):
        rt, rid = v.get("resourceType"), v.get("id")
        if type(rt) is str and type(rid) is str:
            c.references.append((param, rt, rid, None))
        return
    literal = v.get("reference")
    if type(literal) is str and literal and not literal.startswith("#"):
        c.references.append((param, *reference_row(literal)))
    ident = v.get("identifier")
    if type(ident) is dict:
        token(c, param + IDENTIFIER_SUFFIX, "Identifier", ident)


# --- number and quantity -----------------------------------------------------------------------


def _number(v: Any) -> tuple[float, float, float] | None:
    text = number_text(v)
    if text is None:
        return None
    low, high = number_range(text)
    return float(text), low, high


def _range_bounds(v: dict[str, Any]) -> tuple[float, float, float, dict[str, Any]] | None:
    lo, hi = v.get("low"), v.get("high")
    lo_n = _number(lo.get("value")) if type(lo) is dict else None
    hi_n = _number(hi.get("value")) if type(hi) is dict else None
    if lo_n is None and hi_n is None:
        return None
    low = lo_n[0] if lo_n else NUMBER_MIN
    high = hi_n[0] if hi_n else NUMBER_MAX
    value = lo_n[0] if lo_n else high
    unit_source = lo if lo_n else hi
    return value, low, high, unit_source  # type: ignore[return-value]


def number(c: Collector, param: str, fhir_type: str | None, v: Any) -> None:
    """decimal/integer values with their implied precision range; a Range spans low..high."""
    if type(v) is dict:
        if (fhir_type or guess_type(v)) == "Range":
            r = _range_bounds(v)
            if r:
                c.numbers.append((param, r[0], r[1], r[2]))
        elif "value" in v:  # a Quantity where a number was asked for
            n = _number(v.get("value"))
            if n:
                c.numbers.append((param, *n))
        return
    n = _number(v)
    if n:
        c.numbers.append((param, *n))


def quantity(c: Collector, param: str, fhir_type: str | None, v: Any) -> None:
    """Quantity and its profiles, Money, and Range (as one row spanning low..high).

    The row's code is ``code`` or, failing that, ``unit``; when a Quantity has both and they
    differ, a second row with system "" carries the unit so ``value||unit`` searches match.
    """
    if type(v) is not dict:
        n = _number(v)
        if n:
            c.quantities.append((param, *n, "", None))
        return
    if fhir_type is None:
        fhir_type = guess_type(v)
    if fhir_type == "Range":
        r = _range_bounds(v)
        if r:
            src = r[3]
            c.quantities.append(
                (param, r[0], r[1], r[2], _clip(_text(src.get("system")) or ""), _text(src.get("code")) or _text(src.get("unit")))
            )
        return
    if fhir_type == "Money":
        n = _number(v.get("value"))
        if n:
            currency = _text(v.get("currency"))
            c.quantities.append((param, *n, ISO_4217 if currency else "", currency))
        return
    if fhir_type not in _QUANTITY_TYPES:
        return
    n = _number(v.get("value"))
    if n is None:
        return
    system = _clip(_text(v.get("system")) or "")
    code = _text(v.get("code"))
    unit = _text(v.get("unit"))
    c.quantities.append((param, *n, system, code or unit))
    if code and unit and unit != code:
        c.quantities.append((param, *n, "", unit))


# --- uri --------------------------------------------------------------------------------------


def uri(c: Collector, param: str, fhir_type: str | None, v: Any) -> None:
    """uri/url/canonical/oid/uuid values as written."""
    if type(v) is str and v:
        c.uris.append((param, _clip(v)))


#: Converter per SearchParameter type. composite and special parameters are not indexed here.
CONVERTERS: dict[str, Converter] = {
    "token": token,
    "string": string,
    "date": date,
    "reference": reference,
    "number": number,
    "quantity": quantity,
    "uri": uri,
}
