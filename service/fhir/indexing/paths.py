"""Compile SearchParameter FHIRPath expressions ONCE into fast accessors over resource JSON.

Evaluating FHIRPath with fhirpathpy costs milliseconds per resource, far too slow for a store
that indexes every write. But almost every R4 search expression is a plain path with a few
well-known decorations, so we compile those into a list of "branches": sequences of dict-key
lookups and simple filters, each ending in a known FHIR type. Supported forms:

* ``Patient.name.family``                       child elements (backbone elements and datatypes)
* ``Observation.effective``                     choice elements expand to effectiveDateTime, ...
* ``(Observation.value as Quantity)``, ``.as(X)``, ``.ofType(X)``   keep the branch of type X
* ``(Observation.value as CodeableConcept).text``                   navigation after a cast
* ``Account.subject.where(resolve() is Patient)``                   reference target-type filter
* ``Patient.telecom.where(system='phone')``                         equality on a primitive child
* ``Patient.extension('http://...').value``                          extension by url
* ``Bundle.entry[0].resource``, ``.first()``                         indexer
* ``Patient.deceased.exists() and Patient.deceased != false``        see ExistsNotFalseAccessor

Anything else (``exists()``, boolean logic, unknown elements) falls back to a compiled
fhirpathpy expression, whose results carry no type, so the value converters infer the datatype
from the JSON shape. ``DirectAccessor`` and ``FhirPathFallback`` share one call signature.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Protocol

import fhirpathpy
from fhirpathpy.models import models

from service.fhir.indexing.model import (
    ABSTRACT_RESOURCES,
    PRIMITIVES,
    RESOURCE_TYPES,
    children,
    is_a,
    normalize_type,
)

log = logging.getLogger(__name__)

#: What an accessor returns: (FHIR type or None when unknown, values found) per branch.
Found = list[tuple[str | None, list[Any]]]


class Unsupported(ValueError):
    """The expression is outside the directly compilable subset: use FHIRPath instead."""


# ---------------------------------------------------------------------------------------------
# Unions: one SearchParameter expression covers several base types.


def split_union(expression: str) -> list[str]:
    """Split ``A.x | (B.y as T) | C.z.where(a='|')`` at top-level ``|`` only (not inside
    parentheses, brackets or string literals)."""
    parts: list[str] = []
    depth = 0
    quote = False
    start = 0
    i = 0
    while i < len(expression):
        ch = expression[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == "'":
                quote = False
        elif ch == "'":
            quote = True
        elif ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif ch == "|" and depth == 0:
            parts.append(expression[start:i].strip())
            start = i + 1
        i += 1
    parts.append(expression[start:].strip())
    return [p for p in parts if p]


_ROOT = re.compile(r"^[\s(]*([A-Za-z][A-Za-z0-9]*)")


def root_of(part: str) -> str | None:
    """The type an expression part starts from: ``(Observation.value as X)`` → Observation."""
    m = _ROOT.match(part)
    return m.group(1) if m else None


def parts_for_base(expression: str, base: str) -> list[str]:
    """The union members of ``expression`` that apply to resource type ``base``.

    Members rooted at ``Resource``/``DomainResource`` apply to every type. When no member names
    ``base`` (a hand-written custom parameter, say), the whole expression is kept.
    """
    parts = split_union(expression)
    mine = [p for p in parts if root_of(p) == base or root_of(p) in ABSTRACT_RESOURCES]
    return mine or parts


# ---------------------------------------------------------------------------------------------
# Parsing the supported subset into a flat list of operations.

_TOKEN = re.compile(
    r"\s*(?:(?P<str>'(?:[^'\\]|\\.)*')|(?P<num>\d+(?:\.\d+)?)|(?P<ident>[A-Za-z_][A-Za-z0-9_]*|`[^`]+`)"
    r"|(?P<punct>!=|<=|>=|[.()\[\]=|,<>+\-*/&~!]))"
)

Op = tuple[Any, ...]  # ("root", T) ("child", name) ("cast", T) ("eq", field, literal)
# ("resolve_is", T) ("extension", url) ("index", n)


def _tokenize(expression: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(expression):
        if expression[pos:].strip() == "":
            break
        m = _TOKEN.match(expression, pos)
        if not m or m.end() == pos:
            raise Unsupported(f"cannot tokenize at {expression[pos:]!r}")
        kind = m.lastgroup or ""
        text = m.group(kind)
        if kind == "ident" and text.startswith("`"):
            text = text[1:-1]
        tokens.append((kind, text))
        pos = m.end()
    return tokens


class _Parser:
    """Recursive descent over: expr := term ('as' TYPE)? ; term := atom ('.' call | '[' N ']')* ;
    atom := '(' expr ')' | IDENT."""

    def __init__(self, expression: str) -> None:
        self.tokens = _tokenize(expression)
        self.pos = 0

    def parse(self) -> list[Op]:
        ops = self._expr()
        if self.pos != len(self.tokens):
            raise Unsupported(f"unexpected {self.tokens[self.pos][1]!r}")
        return ops

    def _peek(self, text: str | None = None, kind: str | None = None) -> bool:
        if self.pos >= len(self.tokens):
            return False
        k, t = self.tokens[self.pos]
        return (text is None or t == text) and (kind is None or k == kind)

    def _take(self, text: str | None = None, kind: str | None = None) -> str:
        if not self._peek(text, kind):
            got = self.tokens[self.pos][1] if self.pos < len(self.tokens) else "end"
            raise Unsupported(f"expected {text or kind}, got {got!r}")
        self.pos += 1
        return self.tokens[self.pos - 1][1]

    def _expr(self) -> list[Op]:
        ops = self._term()
        if self._peek("as", "ident"):
            self.pos += 1
            ops.append(("cast", self._take(kind="ident")))
        return ops

    def _term(self) -> list[Op]:
        if self._peek("("):
            self.pos += 1
            ops = self._expr()
            self._take(")")
        else:
            ops = [("root", self._take(kind="ident"))]
        while True:
            if self._peek("."):
                self.pos += 1
                ops.append(self._call())
            elif self._peek("["):
                self.pos += 1
                ops.append(("index", int(self._take(kind="num"))))
                self._take("]")
            else:
                return ops

    def _call(self) -> Op:
        name = self._take(kind="ident")
        if not self._peek("("):
            return ("child", name)
        self.pos += 1
        if name in ("as", "ofType"):
            op: Op = ("cast", self._take(kind="ident"))
        elif name == "where":
            op = self._condition()
        elif name == "extension":
            op = ("extension", _literal(self._take(kind="str")))
        elif name == "first":
            op = ("index", 0)
        else:
            raise Unsupported(f"function {name}()")
        self._take(")")
        return op

    def _condition(self) -> Op:
        if self._peek("resolve", "ident"):
            self.pos += 1
            self._take("(")
            self._take(")")
            self._take("is")
            return ("resolve_is", self._take(kind="ident"))
        field = self._take(kind="ident")
        self._take("=")
        if self._peek(kind="str"):
            return ("eq", field, _literal(self._take(kind="str")))
        if self._peek("true") or self._peek("false"):
            return ("eq", field, self._take(kind="ident") == "true")
        raise Unsupported("where() condition")


def _literal(token: str) -> str:
    return re.sub(r"\\(.)", r"\1", token[1:-1])


def parse(expression: str) -> list[Op]:
    """Parse one union member into operations, or raise Unsupported."""
    return _Parser(expression).parse()


# ---------------------------------------------------------------------------------------------
# Compiling operations into branches, and running them.

GET, EQ, RESOLVE_IS, INDEX, RESTYPE = range(5)
Step = tuple[int, Any, Any]


@dataclass(frozen=True)
class Branch:
    """A straight line of steps from the resource to values of one FHIR type."""

    steps: tuple[Step, ...]
    type: str
    context: str  # model path to continue from (datatype name or backbone element path)


def compile_branches(expression: str, resource_type: str) -> tuple[Branch, ...]:
    """Compile a single union member for ``resource_type`` into branches, or raise Unsupported."""
    ops = parse(expression)
    if ops[0][0] != "root":
        raise Unsupported("expression must start at a type")
    root = ops[0][1]
    if root in RESOURCE_TYPES and root != resource_type:
        raise Unsupported(f"expression rooted at {root}, not {resource_type}")
    if root != resource_type and root not in ABSTRACT_RESOURCES:
        # FHIRPath resolves a leading element name against the context resource:
        # core's InsurancePlan.name is written "name | alias".
        ops = [("root", resource_type), ("child", root), *ops[1:]]
    ctx = "Resource" if root in ABSTRACT_RESOURCES else resource_type
    branches = [Branch((), resource_type, ctx)]
    for op in ops[1:]:
        branches = _apply(op, branches)
        if not branches:
            raise Unsupported(f"{op} selects nothing")
    return tuple(branches)


def _apply(op: Op, branches: list[Branch]) -> list[Branch]:
    kind = op[0]
    out: list[Branch] = []
    if kind == "child" or kind == "extension":
        name = op[1] if kind == "child" else "extension"
        for b in branches:
            if b.type in PRIMITIVES or b.type in ABSTRACT_RESOURCES:
                raise Unsupported(f"cannot navigate into {b.type}")
            kids = children(b.context, name)
            if not kids:
                raise Unsupported(f"unknown element {b.context}.{name}")
            for k in kids:
                steps = b.steps + ((GET, k.key, None),)
                if kind == "extension":
                    steps += ((EQ, "url", op[1]),)
                out.append(Branch(steps, k.type, k.context))
    elif kind == "cast":
        target = normalize_type(op[1])
        for b in branches:
            if is_a(b.type, target):
                out.append(b)
            elif b.type in ABSTRACT_RESOURCES and target in RESOURCE_TYPES:
                out.append(Branch(b.steps + ((RESTYPE, target, None),), target, target))
    elif kind == "eq":
        field, literal = op[1], op[2]
        for b in branches:
            kids = children(b.context, field) if b.type not in PRIMITIVES else ()
            if len(kids) != 1 or kids[0].type not in PRIMITIVES:
                raise Unsupported(f"where({field}=...) on {b.type}")
            out.append(Branch(b.steps + ((EQ, kids[0].key, literal),), b.type, b.context))
    elif kind == "resolve_is":
        for b in branches:
            if b.type != "Reference":
                raise Unsupported(f"resolve() on {b.type}")
            out.append(Branch(b.steps + ((RESOLVE_IS, op[1], None),), b.type, b.context))
    elif kind == "index":
        if len(branches) != 1:
            raise Unsupported("indexer across a choice")
        b = branches[0]
        out.append(Branch(b.steps + ((INDEX, op[1], None),), b.type, b.context))
    else:
        raise Unsupported(f"operation {kind}")
    return out


_REF_TYPE = re.compile(r"(?:^|/)([A-Z][A-Za-z]+)/[^/]+(?:/_history/[^/]+)?$")


def reference_type(ref: dict[str, Any], root: dict[str, Any]) -> str | None:
    """The resource type a Reference points at, as FHIRPath ``resolve()`` would see it without
    fetching: from the literal reference (relative or absolute), a contained resource, or
    ``Reference.type``."""
    literal = ref.get("reference")
    if isinstance(literal, str):
        if literal.startswith("#"):
            for c in root.get("contained") or ():
                if isinstance(c, dict) and c.get("id") == literal[1:]:
                    return c.get("resourceType")
            return None
        m = _REF_TYPE.search(literal)
        if m and m.group(1) in RESOURCE_TYPES:
            return m.group(1)
    t = ref.get("type")
    return t if isinstance(t, str) else None


class Accessor(Protocol):
    """Either kind of compiled expression: call with a resource, get typed values back."""

    direct: bool
    expression: str

    def __call__(self, resource: dict[str, Any]) -> Found: ...


class DirectAccessor:
    """Runs compiled branches over resource JSON with plain dict lookups."""

    direct = True

    def __init__(self, expression: str, branches: tuple[Branch, ...]) -> None:
        self.expression = expression
        # (first key looked up on the resource or None, remaining steps, type). Nearly every
        # branch starts with a key lookup, and most are nothing more: that case is inlined.
        self.branches = tuple(
            (b.steps[0][1], b.steps[1:], b.type) if b.steps and b.steps[0][0] == GET else (None, b.steps, b.type)
            for b in branches
        )

    def __call__(self, resource: dict[str, Any]) -> Found:
        found: Found = []
        for first, steps, type_name in self.branches:
            values: list[Any]
            if first is not None:
                x = resource.get(first)
                if x is None:
                    continue
                values = x if type(x) is list else [x]  # read-only from here on: no copy
            else:
                values = [resource]
            for op, a, b in steps:
                if op == GET:
                    nxt: list[Any] = []
                    for v in values:
                        if type(v) is dict:
                            x = v.get(a)
                            if x is not None:
                                if type(x) is list:
                                    nxt.extend(x)
                                else:
                                    nxt.append(x)
                    values = nxt
                elif op == EQ:
                    values = [v for v in values if type(v) is dict and v.get(a) == b]
                elif op == RESOLVE_IS:
                    values = [v for v in values if type(v) is dict and reference_type(v, resource) == a]
                elif op == INDEX:
                    values = values[a : a + 1]
                else:  # RESTYPE
                    values = [v for v in values if type(v) is dict and v.get("resourceType") == a]
                if not values:
                    break
            if values:
                found.append((type_name, values))
        return found

    def __repr__(self) -> str:
        return f"DirectAccessor({self.expression!r})"


_EXISTS_NOT_FALSE = re.compile(r"^\s*(\w+(?:\.\w+)+)\.exists\(\)\s+and\s+(\w+(?:\.\w+)+)\s*!=\s*false\s*$")


class ExistsNotFalseAccessor:
    """``X.exists() and X != false`` (core's Patient-deceased): true when X is present and is
    not the boolean false (a deceasedDateTime counts as true), false when X is absent.

    The one R4 core expression beyond plain paths; answering it directly keeps FHIRPath off the
    Patient write path, where it cost a quarter of the indexing time.
    """

    direct = True

    def __init__(self, expression: str, inner: DirectAccessor) -> None:
        self.expression = expression
        self.inner = inner

    def __call__(self, resource: dict[str, Any]) -> Found:
        values = [v for _, vs in self.inner(resource) for v in vs]
        return [("boolean", [bool(values) and not (len(values) == 1 and values[0] is False)])]

    @classmethod
    def compile(cls, expression: str, resource_type: str) -> ExistsNotFalseAccessor | None:
        m = _EXISTS_NOT_FALSE.match(expression)
        if not m or m.group(1) != m.group(2):
            return None
        return cls(expression, DirectAccessor(m.group(1), compile_branches(m.group(1), resource_type)))


class FhirPathFallback:
    """Evaluates an expression with fhirpathpy, compiled once. Results carry no FHIR type."""

    direct = False

    def __init__(self, expression: str) -> None:
        self.expression = expression
        self._fn = fhirpathpy.compile(expression, model=models["r4"])
        self._warned = False

    def __call__(self, resource: dict[str, Any]) -> Found:
        try:
            values = self._fn(resource)
        except Exception as exc:  # an unsupported function must not fail the write
            if not self._warned:
                log.warning("search expression %r failed: %s", self.expression, exc)
                self._warned = True
            return []
        values = [v for v in values if v is not None]
        return [(None, values)] if values else []

    def __repr__(self) -> str:
        return f"FhirPathFallback({self.expression!r})"


class UnionAccessor:
    """Several compiled union members for one type; direct only when all members are."""

    def __init__(self, expression: str, members: list[Accessor]) -> None:
        self.expression = expression
        self.members = members
        self.direct = all(m.direct for m in members)

    def __call__(self, resource: dict[str, Any]) -> Found:
        found: Found = []
        for m in self.members:
            found.extend(m(resource))
        return found


def compile_expression(expression: str, resource_type: str) -> Accessor:
    """Compile a (possibly union) expression for one resource type.

    Each union member becomes a DirectAccessor when it is in the supported subset, otherwise a
    FhirPathFallback; members rooted at another type are dropped.
    """
    members: list[Accessor] = []
    for part in parts_for_base(expression, resource_type):
        try:
            members.append(
                ExistsNotFalseAccessor.compile(part, resource_type)
                or DirectAccessor(part, compile_branches(part, resource_type))
            )
        except Unsupported as why:
            log.debug("fallback to FHIRPath for %s %r: %s", resource_type, part, why)
            members.append(FhirPathFallback(part))
    if len(members) == 1:
        return members[0]
    return UnionAccessor(expression, members)
