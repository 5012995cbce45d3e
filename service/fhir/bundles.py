"""Batch and transaction Bundles, and history Bundles.

A transaction runs every entry through one :class:`StoreTransaction`: all or nothing.
Processing order follows FHIR R4 (http.html#trules): DELETE, POST, PUT/PATCH, GET.
``urn:uuid:`` fullUrls and conditional references (``Patient?identifier=...``) are resolved
before anything is written, and rewritten in every reference of every entry.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import orjson

from service.fhir.access import AccessContext
from service.fhir.errors import BadRequest, FhirError, Issue, PreconditionFailed, Unprocessable
from service.fhir.ids import new_id
from service.fhir.matching import Matcher
from service.fhir.store import (
    HistoryEntry,
    ResourceStore,
    StoredResource,
    StoreTransaction,
    fhir_instant,
    parse_version,
)
from service.fhir.validation import known_resource_types, validate_resource

_BULK_CHUNK = 1000  # creates per multi-row INSERT batch
_ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "PATCH": 2, "GET": 3, "HEAD": 3}
_REASONS = {200: "OK", 201: "Created", 204: "No Content", 304: "Not Modified", 400: "Bad Request",
            401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 409: "Conflict", 410: "Gone",
            412: "Precondition Failed", 422: "Unprocessable Entity", 500: "Internal Server Error"}


@dataclass
class _Entry:
    index: int
    method: str
    url: str
    resource_type: str
    resource_id: str | None
    query: str | None
    resource: dict[str, Any] | None
    full_url: str | None
    if_none_exist: str | None = None
    if_match: int | None = None
    matched_existing: bool = False  # a conditional create that found its resource
    response: dict[str, Any] = field(default_factory=dict)


def process_bundle(store: ResourceStore, ctx: AccessContext, bundle: dict[str, Any], *, base_url: str) -> bytes:
    if bundle.get("resourceType") != "Bundle":
        raise BadRequest("POST [base] takes a Bundle of type batch or transaction", expression="resourceType")
    kind = bundle.get("type")
    if kind not in ("batch", "transaction"):
        raise BadRequest(f"Bundle.type is {kind!r}; POST [base] takes batch or transaction", expression="Bundle.type")
    raw_entries = bundle.get("entry") or []
    if not isinstance(raw_entries, list):
        raise BadRequest("Bundle.entry must be an array", expression="Bundle.entry")
    if kind == "transaction":
        entries = [_parse_entry(i, raw, base_url) for i, raw in enumerate(raw_entries)]
        _run_transaction(store, ctx, entries, base_url)
        responses = [e.response for e in entries]
    else:
        responses = [_run_batch_entry(store, ctx, i, raw, base_url) for i, raw in enumerate(raw_entries)]
    return orjson.dumps({
        "resourceType": "Bundle",
        "id": new_id(),
        "type": f"{kind}-response",
        "entry": [{"response": r["response"], **({"resource": r["resource"]} if "resource" in r else {})}
                  for r in responses],
    })


# -- parsing --------------------------------------------------------------------------------

def _parse_entry(index: int, raw: Any, base_url: str) -> _Entry:
    where = f"Bundle.entry[{index}]"
    if not isinstance(raw, dict):
        raise BadRequest(f"{where} is not an object", expression=where)
    request = raw.get("request")
    if not isinstance(request, dict) or not request.get("method") or not request.get("url"):
        raise BadRequest(f"{where}.request needs method and url", expression=f"{where}.request")
    method = str(request["method"]).upper()
    if method not in _ORDER:
        raise BadRequest(f"{where}.request.method {method} is not supported", expression=f"{where}.request.method")
    url = str(request["url"])
    if url.startswith(base_url):
        url = url[len(base_url):]
    url = url.lstrip("/")
    path, _, query = url.partition("?")
    parts = [unquote(p) for p in path.split("/") if p]
    if not parts or parts[0] not in known_resource_types():
        raise BadRequest(f"{where}.request.url '{request['url']}' does not name a resource type",
                         expression=f"{where}.request.url")
    resource = raw.get("resource")
    if method in ("POST", "PUT") and not isinstance(resource, dict):
        raise BadRequest(f"{where} ({method}) has no resource", expression=f"{where}.resource")
    if method == "PATCH":
        raise BadRequest(f"{where}: PATCH inside a Bundle is not supported yet; use PUT",
                         expression=f"{where}.request.method")
    entry = _Entry(index=index, method=method, url=url, resource_type=parts[0],
                   resource_id=parts[1] if len(parts) > 1 else None, query=query or None,
                   resource=resource if isinstance(resource, dict) else None,
                   full_url=raw.get("fullUrl"), if_none_exist=_criteria(request.get("ifNoneExist")),
                   if_match=parse_version(request.get("ifMatch")))
    if entry.resource is not None and entry.resource.get("resourceType") != entry.resource_type:
        raise BadRequest(f"{where}: the resource is a {entry.resource.get('resourceType')!r} but the url names "
                         f"{entry.resource_type}", expression=f"{where}.resource.resourceType")
    return entry


def _criteria(value: Any) -> str | None:
    if not value:
        return None
    text = str(value)
    return text.split("?", 1)[1] if "?" in text else text


# -- transaction ----------------------------------------------------------------------------

def _run_transaction(store: ResourceStore, ctx: AccessContext, entries: list[_Entry], base_url: str) -> None:
    _check_unique_targets(entries)
    for entry in entries:  # validate everything before touching the database
        if entry.resource is not None:
            issues = validate_resource(entry.resource, expected_type=entry.resource_type)
            if issues:
                raise Unprocessable(issues=[_at_entry(entry.index, issue) for issue in issues])
    with store.write(ctx) as tx:
        ids, matcher = _assign_ids(tx, entries)
        for entry in entries:
            if entry.resource is not None:
                try:
                    _rewrite_references(entry.resource, ids, matcher)
                except FhirError as exc:
                    raise _entry_error(entry, exc) from None
        ordered = sorted(entries, key=lambda e: (_ORDER[e.method], e.index))
        for entry in ordered:
            if entry.method == "DELETE":
                _execute_or_name(tx, entry, ids, base_url)
        _create_all(tx, [e for e in ordered if e.method == "POST" and not e.matched_existing], base_url)
        for entry in ordered:
            if entry.method not in ("DELETE", "POST") or entry.matched_existing:
                _execute_or_name(tx, entry, ids, base_url)


def _execute_or_name(tx: StoreTransaction, entry: _Entry, ids: dict[str, str], base_url: str) -> None:
    try:
        entry.response = _execute(tx, entry, ids, base_url)
    except FhirError as exc:
        raise _entry_error(entry, exc) from None


def _create_all(tx: StoreTransaction, creates: list[_Entry], base_url: str) -> None:
    """The creates of a transaction: plain ones in a few multi-row statements first, then, one
    by one in Bundle order, those whose domain hooks read or write other resources (so that a
    referral created in the same Bundle as its Patient can route on that Patient)."""
    plain = [e for e in creates if not tx.hooks.in_order(e.resource_type)]
    for start in range(0, len(plain), _BULK_CHUNK):
        chunk = plain[start:start + _BULK_CHUNK]
        try:
            stored = tx.create_many([(e.resource, e.resource_id) for e in chunk])  # type: ignore[misc]
        except FhirError as exc:
            # A hook refused one resource of the chunk: name the entry it was about.
            failing = next((e for e in chunk if e.resource_type in str(exc)), chunk[0])
            raise _entry_error(failing, exc) from None
        for entry, resource in zip(chunk, stored, strict=True):
            entry.response = _write_response(resource, 201, base_url)
    for entry in creates:
        if tx.hooks.in_order(entry.resource_type):
            _execute_or_name(tx, entry, {}, base_url)


def _check_unique_targets(entries: list[_Entry]) -> None:
    seen: dict[str, int] = {}
    for entry in entries:
        if entry.method in ("PUT", "DELETE") and entry.resource_id:
            key = f"{entry.resource_type}/{entry.resource_id}"
            if key in seen:
                raise BadRequest(f"Bundle.entry[{entry.index}] and Bundle.entry[{seen[key]}] both change {key}; "
                                 "a transaction may touch a resource once", expression=f"Bundle.entry[{entry.index}]")
            seen[key] = entry.index


def _assign_ids(tx: StoreTransaction, entries: list[_Entry]) -> tuple[dict[str, str], Matcher]:
    """Map each fullUrl to the reference it will have once written.

    Every conditional query of the Bundle (ifNoneExist, conditional PUT/DELETE, conditional
    references) is resolved up front, in a few set-based queries, after the match keys of
    the conditional creates are locked (so that concurrent Bundles cannot both create).
    """
    matcher = Matcher(tx)
    creates = [e for e in entries if e.method == "POST" and e.if_none_exist]
    tx.lock_match_keys([(e.resource_type, e.if_none_exist or "") for e in creates])
    matcher.prefetch(_conditional_queries(entries))
    ids: dict[str, str] = {}
    for entry in entries:
        target: str | None = None
        if entry.method == "POST":
            if entry.if_none_exist:
                matches = matcher.find(entry.resource_type, entry.if_none_exist)
                if len(matches) > 1:
                    raise _entry_error(entry, PreconditionFailed(
                        f"ifNoneExist '{entry.if_none_exist}' matches {len(matches)} resources"))
                if matches:
                    entry.resource_id = matches[0]
                    entry.matched_existing = True
            if entry.resource_id is None:
                entry.resource_id = new_id()
            if entry.if_none_exist:
                matcher.remember(entry.resource_type, entry.if_none_exist, entry.resource_id)
            target = f"{entry.resource_type}/{entry.resource_id}"
        elif entry.method == "PUT":
            if entry.resource_id is None and entry.query:
                matches = matcher.find(entry.resource_type, entry.query)
                if len(matches) > 1:
                    raise _entry_error(entry, PreconditionFailed(f"'{entry.query}' matches {len(matches)} resources"))
                entry.resource_id = matches[0] if matches else (entry.resource or {}).get("id") or new_id()
            target = f"{entry.resource_type}/{entry.resource_id}"
        if target and entry.full_url:
            ids[entry.full_url] = target
    return ids, matcher


def _conditional_queries(entries: list[_Entry]) -> set[tuple[str, str]]:
    queries: set[tuple[str, str]] = set()
    for entry in entries:
        if entry.method == "POST" and entry.if_none_exist:
            queries.add((entry.resource_type, entry.if_none_exist))
        elif entry.method in ("PUT", "DELETE") and entry.resource_id is None and entry.query:
            queries.add((entry.resource_type, entry.query))
        for holder in _reference_holders(entry.resource or {}):
            reference = holder["reference"]
            if "?" in reference and not reference.startswith(("#", "urn:")):
                resource_type, _, query = reference.partition("?")
                queries.add((resource_type, query))
    return queries


def _rewrite_references(node: Any, ids: dict[str, str], matcher: Matcher) -> None:
    """Rewrite urn:uuid and conditional references in place, everywhere in the resource."""
    for holder in _reference_holders(node):
        reference = holder["reference"]
        if reference in ids:
            holder["reference"] = ids[reference]
        elif reference.startswith("urn:uuid:") or reference.startswith("urn:oid:"):
            raise BadRequest(f"reference '{reference}' names no entry of this Bundle")
        elif "?" in reference and not reference.startswith("#"):
            resource_type, _, query = reference.partition("?")
            matches = matcher.find(resource_type, query)
            if len(matches) != 1:
                found = "no" if not matches else f"{len(matches)}"
                raise PreconditionFailed(f"conditional reference '{reference}' matches {found} resources; "
                                         "it must match exactly one")
            holder["reference"] = f"{resource_type}/{matches[0]}"


def _reference_holders(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        if isinstance(node.get("reference"), str):
            yield node
        for key, value in node.items():
            if key != "contained" and isinstance(value, (dict, list)):
                yield from _reference_holders(value)
    elif isinstance(node, list):
        for item in node:
            yield from _reference_holders(item)


def _execute(tx: StoreTransaction, entry: _Entry, ids: dict[str, str], base_url: str) -> dict[str, Any]:
    if entry.method == "DELETE":
        if entry.resource_id is None:
            matches = tx.find(entry.resource_type, entry.query or "")
            if len(matches) > 1:
                raise PreconditionFailed(f"'{entry.query}' matches {len(matches)} resources")
            entry.resource_id = matches[0] if matches else None
        deleted = tx.delete(entry.resource_type, entry.resource_id) if entry.resource_id else None
        return {"response": {"status": "204 No Content", **({"etag": deleted.etag} if deleted else {})}}
    if entry.matched_existing:
        return _write_response(tx.read(entry.resource_type, entry.resource_id or ""), 200, base_url)
    if entry.method == "POST":
        assert entry.resource is not None and entry.resource_id is not None
        result = tx.create(entry.resource, resource_id=entry.resource_id)
        return _write_response(result.resource, 201, base_url)
    if entry.method == "PUT":
        assert entry.resource is not None and entry.resource_id is not None
        if entry.resource.get("id") is None:
            entry.resource["id"] = entry.resource_id
        result = tx.update(entry.resource_type, entry.resource_id, entry.resource, if_match=entry.if_match)
        return _write_response(result.resource, 201 if result.created else 200, base_url)
    return _read_entry(tx, entry, base_url)


def _read_entry(tx: StoreTransaction, entry: _Entry, base_url: str) -> dict[str, Any]:
    if entry.resource_id is None:
        from service.fhir.search import execute_search, parse_search, searchset_bundle
        from urllib.parse import parse_qsl

        request = parse_search(entry.resource_type, parse_qsl(entry.query or "", keep_blank_values=True))
        tx.authorize("search", entry.resource_type)
        page = execute_search(tx.conn, request, visible=tx.boundary, visible_key=tx.visibility_key())
        return {"response": {"status": "200 OK"}, "resource": orjson.loads(searchset_bundle(page, base_url=base_url))}
    path = entry.url.split("?")[0].split("/")
    if len(path) >= 4 and path[2] == "_history":
        stored = tx.vread(entry.resource_type, entry.resource_id, parse_version(path[3]) or 0)
    else:
        stored = tx.read(entry.resource_type, entry.resource_id)
    return {"response": {"status": "200 OK", "etag": stored.etag, "lastModified": fhir_instant(stored.last_updated)},
            "resource": stored.as_dict()}


def _write_response(stored: StoredResource, status: int, base_url: str) -> dict[str, Any]:
    return {"response": {
        "status": f"{status} {_REASONS[status]}",
        "location": f"{stored.resource_type}/{stored.id}/_history/{stored.version_id}",
        "etag": stored.etag,
        "lastModified": fhir_instant(stored.last_updated),
    }}


def _at_entry(index: int, issue: Issue) -> Issue:
    where = f"Bundle.entry[{index}].resource"
    expression = tuple(f"{where}.{e}" for e in issue.expression) or (where,)
    return Issue(issue.severity, issue.code, f"Bundle.entry[{index}]: {issue.diagnostics}", expression)


def _entry_error(entry: _Entry, exc: FhirError) -> FhirError:
    """Name the failing entry in the single OperationOutcome of a failed transaction."""
    issues = [Issue(i.severity, i.code, f"Bundle.entry[{entry.index}] ({entry.method} {entry.url}): {i.diagnostics}",
                    i.expression or (f"Bundle.entry[{entry.index}]",)) for i in exc.issues]
    clone = copy.copy(exc)
    clone.issues = issues
    return clone


# -- batch ----------------------------------------------------------------------------------

def _run_batch_entry(store: ResourceStore, ctx: AccessContext, index: int, raw: Any, base_url: str) -> dict[str, Any]:
    """Each batch entry succeeds or fails on its own, in its own transaction."""
    try:
        entry = _parse_entry(index, raw, base_url)
        if entry.resource is not None:
            issues = validate_resource(entry.resource, expected_type=entry.resource_type)
            if issues:
                raise Unprocessable(issues=issues)
        if entry.method in ("GET", "HEAD"):
            with store.read_only(ctx) as tx:
                return _read_entry(tx, entry, base_url)
        with store.write(ctx) as tx:
            ids, matcher = _assign_ids(tx, [entry])
            if entry.resource is not None:
                _rewrite_references(entry.resource, ids, matcher)
            return _execute(tx, entry, ids, base_url)
    except FhirError as exc:
        return {"response": {"status": f"{exc.status} {_REASONS.get(exc.status, '')}".strip(),
                             "outcome": exc.outcome()}}


# -- history --------------------------------------------------------------------------------

def history_bundle(entries: list[HistoryEntry], *, base_url: str, path: str, count: int,
                   since: str | None) -> bytes:
    prefix = f"{base_url}/{path}/_history" if path else f"{base_url}/_history"
    links = [{"relation": "self", "url": prefix + (f"?_count={count}" + (f"&_since={since}" if since else ""))}]
    if len(entries) == count:
        links.append({"relation": "next", "url": f"{prefix}?_count={count}&_before_seq={entries[-1].resource.seq}"
                      + (f"&_since={since}" if since else "")})
    parts = [b'{"resourceType":"Bundle","type":"history","link":', orjson.dumps(links), b',"entry":[']
    for position, item in enumerate(entries):
        stored = item.resource
        request = {"method": item.method, "url": f"{stored.resource_type}/{stored.id}"}
        status = {"POST": "201 Created", "DELETE": "204 No Content"}.get(item.method, "200 OK")
        head = {"fullUrl": f"{base_url}/{stored.resource_type}/{stored.id}", "request": request,
                "response": {"status": status, "etag": stored.etag,
                             "lastModified": fhir_instant(stored.last_updated)}}
        encoded = orjson.dumps(head)
        if stored.json is not None:
            encoded = encoded[:-1] + b',"resource":' + stored.json + b"}"
        if position:
            parts.append(b",")
        parts.append(encoded)
    parts.append(b"]}")
    return b"".join(parts)

