"""The resource store: versioned FHIR resources, indexed on write.

Every REST interaction is one database transaction (:meth:`ResourceStore.write` /
:meth:`ResourceStore.read_only`); a transaction Bundle is also one, running many
interactions through the same :class:`StoreTransaction`. Every entry point takes the
caller's :class:`AccessContext`, so authorization and audit have one place to live.

Layout (see ``tables.py``): each version's JSON is stored once in ``resource_version``
whose primary key ``seq`` is the store-wide change sequence; ``resource`` points at the
current version. The JSON we store already carries ``id`` and ``meta.versionId`` /
``meta.lastUpdated``, so a read returns the stored text as it is, without re-serialising.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Hashable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from service.fhir import pg_writes, tables, token_sets
from service.fhir.access import AccessContext
from service.fhir.db import execute_prepared, is_postgres, read_transaction, write_transaction
from service.fhir.errors import BadRequest, Gone, NotFound, PreconditionFailed, Unprocessable
from service.fhir.hooks import AccessPolicy, OpenPolicy, WriteEvent, WriteHooks
from service.fhir.ids import new_id
from service.fhir.indexing import IndexRows, index_resource
from service.fhir.statements import Prepared, StatementCache
from service.fhir.validation import validate_resource

Clock = Callable[[], datetime]

R = tables.ResourceRow.__table__
V = tables.ResourceVersion.__table__
OUTBOX = tables.OutboxEvent.__table__

_INDEX_TARGETS = tables.INDEX_TARGETS


def utc_now() -> datetime:
    return datetime.now(UTC)


@functools.lru_cache(maxsize=256)  # a batch stamps hundreds of resources with one moment
def fhir_instant(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class StoredResource:
    """One version of a resource as stored. ``json`` is the exact body to send."""

    resource_type: str
    id: str
    version_id: int
    last_updated: datetime
    json: bytes | None  # None for a deletion
    seq: int = 0

    @property
    def deleted(self) -> bool:
        return self.json is None

    @property
    def etag(self) -> str:
        return f'W/"{self.version_id}"'

    @property
    def reference(self) -> str:
        return f"{self.resource_type}/{self.id}"

    def as_dict(self) -> dict[str, Any]:
        if self.json is None:
            raise Gone(f"{self.reference} is deleted")
        return orjson.loads(self.json)


@dataclass(frozen=True)
class WriteResult:
    resource: StoredResource
    created: bool  # a new logical resource (201)
    changed: bool = True  # False when a conditional create matched an existing resource


@dataclass(frozen=True)
class CurrentState:
    """A resource's current version as read under its row lock (:meth:`StoreTransaction.locked_state`)."""
    version_id: int
    deleted: bool
    content: dict[str, Any] | None  # None when the current version is a deletion


@dataclass(frozen=True)
class HistoryEntry:
    resource: StoredResource
    method: str  # POST | PUT | PATCH | DELETE


def _json_text(column: sa.ColumnElement) -> sa.ColumnElement:
    """Select stored JSON as text, so that reads never parse and re-serialise it."""
    return sa.cast(column, sa.Text)


# The store's own look-ups by primary key, built once (constructing a statement costs more
# than running it).
_CURRENT_VERSION = sa.select(R.c.version_id, R.c.deleted).where(
    R.c.resource_type == sa.bindparam("t"), R.c.id == sa.bindparam("i"))
_CURRENT_VERSION_FOR_UPDATE = _CURRENT_VERSION.with_for_update()
_READ = (sa.select(R.c.version_id, R.c.last_updated, R.c.seq, _json_text(V.c.content))
         .select_from(R.join(V, V.c.seq == R.c.seq))
         .where(R.c.resource_type == sa.bindparam("t"), R.c.id == sa.bindparam("i")))
# The same read on PostgreSQL for a caller without a boundary, as a prepared statement: the
# commonest request of all (HIS integrations act for the whole alliance), and through
# SQLAlchemy its compilation and parameter handling cost more than PostgreSQL's work.
_READ_PG = ("SELECT r.version_id, r.last_updated, r.seq, v.content::text FROM resource r"
            " JOIN resource_version v ON v.seq = r.seq WHERE r.resource_type = $1 AND r.id = $2")
#: Read statements under a caller's boundary, by (visibility key, type, PostgreSQL?): prepared
#: where they qualify (``Prepared.if_plain``), SQLAlchemy statements where they do not.
_BOUNDED_READS: StatementCache[Prepared | sa.Select | None] = StatementCache(1024)
_CURRENT_CONTENT = Prepared(sa.select(_json_text(V.c.content)).select_from(R.join(V, V.c.seq == R.c.seq))
                            .where(R.c.resource_type == sa.bindparam("t"), R.c.id == sa.bindparam("i")))
_LOCKED_STATE_SELECT = (sa.select(R.c.version_id, R.c.deleted, _json_text(V.c.content))
                        .select_from(R.join(V, V.c.seq == R.c.seq))
                        .where(R.c.resource_type == sa.bindparam("t"), R.c.id == sa.bindparam("i")))
_LOCKED_STATE = Prepared(_LOCKED_STATE_SELECT)
_LOCKED_STATE_PG = Prepared(_LOCKED_STATE_SELECT.with_for_update(of=R))


_REF = tables.ReferenceIndex.__table__
_REFERRERS = Prepared(sa.select(_REF.c.resource_id).distinct()
                      .where(_REF.c.resource_type == sa.bindparam("t"), _REF.c.param == sa.bindparam("p"),
                             _REF.c.target_id == sa.bindparam("ti"), _REF.c.target_type == sa.bindparam("tt"))
                      .order_by(_REF.c.resource_id).limit(sa.bindparam("n")))


#: How far :meth:`StoreTransaction.prefetch` follows a chain (an organization's ``partOf``).
PREFETCH_DEPTH = 8
_PREFETCH: StatementCache[Prepared] = StatementCache(64)


def _prefetch_statement(count: int, follow: str | None) -> Prepared:
    """Current content of ``count`` resources (parameters ``t0``/``i0`` ...), and with
    ``follow`` of what they reach through that reference parameter: one statement per shape."""

    def build() -> Prepared:
        # every step carries the version's seq, so that each row is found by an index look-up
        # (a join on (type, id) after the recursion let the planner scan the resource table)
        keys = [sa.tuple_(sa.bindparam(f"t{k}"), sa.bindparam(f"i{k}")) for k in range(count)]
        seeds = sa.select(R.c.resource_type.label("t"), R.c.id.label("i"), R.c.seq.label("s"),
                          sa.literal_column("0").label("d")).where(sa.tuple_(R.c.resource_type, R.c.id).in_(keys))
        if follow is None:
            found = seeds.subquery("found")
        else:
            chain = seeds.cte("chain", recursive=True)
            parent = R.alias("parent")
            step = (sa.select(parent.c.resource_type, parent.c.id, parent.c.seq, chain.c.d + sa.literal_column("1"))
                    .select_from(chain.join(_REF, sa.and_(_REF.c.resource_type == chain.c.t,
                                                          _REF.c.resource_id == chain.c.i, _REF.c.param == follow))
                                 .join(parent, sa.and_(parent.c.resource_type == _REF.c.target_type,
                                                       parent.c.id == _REF.c.target_id)))
                    .where(chain.c.d < PREFETCH_DEPTH))
            found = chain.union(step)
        return Prepared(sa.select(found.c.t, found.c.i, _json_text(V.c.content))
                        .select_from(found.join(V, V.c.seq == found.c.s)))

    return _PREFETCH.get((count, follow), build)


def _utc(moment: datetime) -> datetime:
    """Timestamps come back zone-less (SQLite) or in the session's zone (PostgreSQL); we store UTC."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _to_bytes(text: str | bytes | None) -> bytes | None:
    if text is None:
        return None
    return text.encode() if isinstance(text, str) else text


def _parse_version(value: str | int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, int):
        return value
    text = value.strip()
    if text.startswith("W/"):
        text = text[2:]
    text = text.strip('"')
    try:
        return int(text)
    except ValueError:
        raise BadRequest(f"If-Match / version '{value}' is not a version id like W/\"3\"") from None


parse_version = _parse_version


class StoreTransaction:
    """Reads and writes inside one database transaction, on behalf of one caller."""

    def __init__(self, conn: sa.Connection, ctx: AccessContext, clock: Clock, *,
                 hooks: WriteHooks | None = None, policy: AccessPolicy | None = None,
                 deferred: dict[Any, Callable[[], None]] | None = None) -> None:
        self.conn = conn
        self.ctx = ctx
        #: who asked for this interaction: ``ctx`` itself, or for :meth:`as_system` the caller
        #: whose write led to the follow-up (the audit trail records it as part of theirs)
        self.initiator = ctx
        self.clock = clock
        self.hooks = hooks or WriteHooks()
        self.policy: AccessPolicy = policy or OpenPolicy()
        self._postgres = is_postgres(conn)
        # Work to do once, just before COMMIT (see before_commit); shared with as_system().
        self._deferred: dict[Any, Callable[[], None]] = {} if deferred is None else deferred
        self._reference_cache: dict[tuple[str, str], str | bytes | None] = {}

    def authorize(self, interaction: str, resource_type: str) -> None:
        if not self.ctx.system:
            self.policy.authorize(self.ctx, interaction, resource_type)

    def as_system(self, name: str = "yilian") -> "StoreTransaction":
        """The same transaction acting as the service itself: for follow-up writes a domain
        hook makes on the caller's behalf (a referral's Task), which the caller's own scopes
        need not cover. The hook is responsible for only doing what the workflow requires."""
        system = StoreTransaction(self.conn, AccessContext.internal(name), self.clock,
                                  hooks=self.hooks, policy=self.policy, deferred=self._deferred)
        system._reference_cache = self._reference_cache  # one transaction, one memory
        system.initiator = self.initiator
        return system

    def before_commit(self, key: Any, work: Callable[[], None]) -> Callable[[], None]:
        """Run ``work`` once at the end of this interaction, inside its transaction, just before
        COMMIT (an exception still rolls everything back); returns the work registered under
        ``key`` (the first one wins). For follow-ups cheaper once per transaction than once per
        write — the audit records of a 1,000-entry Bundle — or checks of the final state."""
        return self._deferred.setdefault(key, work)

    def finish(self) -> None:
        """Run the deferred work; :meth:`ResourceStore.write` calls it when the interaction is done."""
        while self._deferred:
            self._deferred.pop(next(iter(self._deferred)))()

    def visible(self, resource_type: str, type_col: sa.ColumnElement,
                id_col: sa.ColumnElement) -> sa.ColumnElement:
        """The caller's visibility rule as a WHERE clause (true for internal callers)."""
        clause = self.boundary(resource_type, type_col, id_col)
        return sa.true() if clause is None else clause

    def boundary(self, resource_type: str, type_col: sa.ColumnElement,
                 id_col: sa.ColumnElement) -> sa.ColumnElement | None:
        """The caller's visibility rule as a WHERE clause; None when it sees every resource of
        the type (searches without a boundary can share statements, see search.shapes)."""
        return None if self.ctx.system else self.policy.visible(self.ctx, resource_type, type_col, id_col)

    def visibility_key(self) -> Hashable | None:
        """Equal for two callers whose boundaries are the same clause (``AccessPolicy.
        visibility_key``): statements built under one serve the other (search.shapes)."""
        if self.ctx.system:
            return ("system",)
        key_of = getattr(self.policy, "visibility_key", None)
        return None if key_of is None else key_of(self.ctx)

    # -- reads ---------------------------------------------------------------------------

    def read(self, resource_type: str, resource_id: str) -> StoredResource:
        self.authorize("read", resource_type)
        query = self._read_query(resource_type)
        if query is None:
            rows = execute_prepared(self.conn, _READ_PG, (resource_type, resource_id))
            row = rows[0] if rows else None
        elif isinstance(query, Prepared):
            row = query.first(self.conn, {"t": resource_type, "i": resource_id})
        else:
            row = self.conn.execute(query, {"t": resource_type, "i": resource_id}).first()
        if row is None:
            raise NotFound(f"{resource_type}/{resource_id} is not known")
        stored = StoredResource(resource_type, resource_id, row[0], _utc(row[1]), _to_bytes(row[3]), row[2])
        if stored.deleted:
            raise Gone(f"{resource_type}/{resource_id} was deleted", headers={"ETag": stored.etag})
        return stored

    def _read_query(self, resource_type: str) -> Prepared | sa.Select | None:
        """The read statement under the caller's boundary; None: the prepared PostgreSQL read
        (no boundary). Built once per boundary (``visibility_key``) and type, and then run as a
        prepared statement on PostgreSQL when it qualifies."""
        key = self.visibility_key()
        if key is None:
            return self._build_read_query(resource_type)

        def build() -> Prepared | sa.Select | None:
            query = self._build_read_query(resource_type)
            if not self._postgres or query is None:
                return query
            return Prepared.if_plain(query) or query

        return _BOUNDED_READS.get((key, resource_type, self._postgres), build)

    def _build_read_query(self, resource_type: str) -> sa.Select | None:
        boundary = self.boundary(resource_type, R.c.resource_type, R.c.id)
        if boundary is None:
            return None if self._postgres else _READ
        return _READ.where(boundary)

    def vread(self, resource_type: str, resource_id: str, version_id: int) -> StoredResource:
        self.authorize("vread", resource_type)
        row = self.conn.execute(
            sa.select(V.c.last_updated, V.c.seq, _json_text(V.c.content)).where(
                V.c.resource_type == resource_type, V.c.id == resource_id, V.c.version_id == version_id,
                self.visible(resource_type, V.c.resource_type, V.c.id),
            )
        ).first()
        if row is None:
            raise NotFound(f"{resource_type}/{resource_id} has no version {version_id}")
        stored = StoredResource(resource_type, resource_id, version_id, _utc(row[0]), _to_bytes(row[2]), row[1])
        if stored.deleted:
            raise Gone(f"{resource_type}/{resource_id} version {version_id} is a deletion")
        return stored

    def may_see(self, resource_type: str, resource_id: str) -> bool:
        """Whether the resource exists (live or deleted) and the caller may see it: an instance
        history outside the caller's boundary answers 404 like a read."""
        return self.conn.execute(sa.select(R.c.id).where(
            R.c.resource_type == resource_type, R.c.id == resource_id,
            self.visible(resource_type, R.c.resource_type, R.c.id))).first() is not None

    def current_version(self, resource_type: str, resource_id: str, *, lock: bool = False) -> tuple[int, bool] | None:
        """(version_id, deleted) of the current version, locking the row for an update."""
        query = _CURRENT_VERSION_FOR_UPDATE if lock and self._postgres else _CURRENT_VERSION
        row = self.conn.execute(query, {"t": resource_type, "i": resource_id}).first()
        return None if row is None else (row[0], row[1])

    def locked_state(self, resource_type: str, resource_id: str) -> CurrentState | None:
        """The current version, number and content, in one statement, with the resource row
        locked (PostgreSQL; SQLite write transactions are serial anyway): what :meth:`update`
        starts from. A caller that needs it before deciding what to write passes it to
        :meth:`update` as ``known``."""
        query = _LOCKED_STATE_PG if self._postgres else _LOCKED_STATE
        row = query.first(self.conn, {"t": resource_type, "i": resource_id})
        if row is None:
            return None
        return CurrentState(row[0], row[1], None if row[1] or row[2] is None else orjson.loads(row[2]))

    def current_content(self, resource_type: str, resource_id: str) -> dict[str, Any] | None:
        """The current JSON (None when absent or deleted), for hooks and write checks."""
        text = _CURRENT_CONTENT.scalar(self.conn, {"t": resource_type, "i": resource_id})
        return None if text is None else orjson.loads(text)

    def reference_content(self, resource_type: str, resource_id: str) -> dict[str, Any] | None:
        """:meth:`current_content` read at most once per transaction: for the reference data a
        domain hook consults again and again (an organization and its ``partOf`` chain, a
        Schedule, a HealthcareService) and this transaction does not change. A write of the
        resource in this transaction forgets the remembered copy."""
        key = (resource_type, resource_id)
        if key not in self._reference_cache:
            self._reference_cache[key] = _CURRENT_CONTENT.scalar(self.conn, {"t": resource_type, "i": resource_id})
        text = self._reference_cache[key]
        return None if text is None else orjson.loads(text)

    def prefetch(self, references: Iterable[str | None], *, follow: str | None = None) -> None:
        """Read several ``Type/id`` references into the memory :meth:`reference_content` keeps,
        in one statement instead of one each; with ``follow`` (a reference search parameter
        such as ``partof``), also what they point at through it, and so on up the chain
        (:data:`PREFETCH_DEPTH` steps). An operation that will consult a caller's
        organization, a referral and a Schedule asks for them together."""
        wanted = sorted({(t, i) for t, _, i in (r.partition("/") for r in references if r and r.count("/") == 1)}
                        - self._reference_cache.keys())
        if not wanted:
            return
        statement = _prefetch_statement(len(wanted), follow)
        values = {name: value for k, (t, i) in enumerate(wanted) for name, value in ((f"t{k}", t), (f"i{k}", i))}
        for resource_type, resource_id, text in statement.rows(self.conn, values):
            self._reference_cache.setdefault((resource_type, resource_id), text)
        for key in wanted:
            self._reference_cache.setdefault(key, None)  # absent: known absent, not asked again

    def emit(self, topic: str, payload: dict[str, Any]) -> int:
        """Record an event in the outbox, in this transaction: it exists iff the write does."""
        return self.conn.execute(
            OUTBOX.insert().returning(OUTBOX.c.seq),
            {"topic": topic, "payload": payload, "created_at": self.clock()},
        ).scalar_one()

    def referrers(self, resource_type: str, param: str, target: str, *, limit: int = 100) -> list[str]:
        """Ids of the ``resource_type`` resources whose reference parameter ``param`` points at
        ``target`` ("Type/id"), whoever may see them: one index look-up, for the service's own
        follow-ups (the Task of a referral), never for what a caller is shown — that is
        :meth:`find`, which applies the caller's boundary."""
        target_type, _, target_id = target.partition("/")
        rows = _REFERRERS.rows(self.conn, {"t": resource_type, "p": param, "tt": target_type, "ti": target_id,
                                           "n": limit})
        return [row[0] for row in rows]

    def find(self, resource_type: str, query: str, *, limit: int = 2) -> list[str]:
        from service.fhir.search import find_matches

        # Only what the caller may see can match: a conditional create/update/delete or a
        # conditional reference never reveals, nor touches, a resource outside its boundary.
        return find_matches(self.conn, resource_type, query, limit=limit, visible=self.boundary,
                            visible_key=self.visibility_key())

    # -- writes --------------------------------------------------------------------------

    def create(self, resource: dict[str, Any], *, if_none_exist: str | None = None,
               resource_id: str | None = None) -> WriteResult:
        """Create with a server-assigned id (``resource_id`` is for ids a Bundle pre-assigned)."""
        resource_type = _require_type(resource)
        self.authorize("create", resource_type)
        if if_none_exist:
            self.lock_match_key(resource_type, if_none_exist)
            matches = self.find(resource_type, if_none_exist)
            if len(matches) > 1:
                raise PreconditionFailed(
                    f"If-None-Exist '{if_none_exist}' matches {len(matches)} {resource_type} resources"
                )
            if matches:
                return WriteResult(self.read(resource_type, matches[0]), created=False, changed=False)
        resource_id = resource_id or new_id()
        event = self._before_write(resource_type, resource_id, "POST", resource, None)
        stored = self._store_new([(resource, resource_id)])[0]
        self._after_write(event)
        return WriteResult(stored, created=True)

    def create_many(self, items: list[tuple[dict[str, Any], str]], *,
                    indexed: list[IndexRows] | None = None) -> list[StoredResource]:
        """Create many resources with pre-assigned ids in a handful of statements.

        The set-based twin of :meth:`create` for transaction Bundles and bulk loads: one
        multi-row INSERT for the versions, one for the pointers, one per index table,
        whatever the number of resources. Hooks and checks run per resource as usual.
        ``indexed``: the resources' ``index_resource`` rows, when the caller computed them
        before its transaction (on SQLite, where a write transaction holds the database's
        only write lock, so that the lock is not held while Python indexes).
        """
        if indexed is not None and len(indexed) != len(items):
            raise ValueError("one IndexRows per resource")
        events = []
        for resource, resource_id in items:
            resource_type = _require_type(resource)
            self.authorize("create", resource_type)
            events.append(self._before_write(resource_type, resource_id, "POST", resource, None))
        stored = self._store_new(items, indexed)
        for event in events:
            self._after_write(event)
        return stored

    def update(self, resource_type: str, resource_id: str, resource: dict[str, Any], *,
               if_match: int | None = None, method: str = "PUT", known: CurrentState | None = None) -> WriteResult:
        """Write the next version (or the first, for a PUT to a new id). ``known``: the current
        state this transaction read with :meth:`locked_state` already, not to be read again."""
        _check_body_matches(resource, resource_type, resource_id)
        self.authorize("patch" if method == "PATCH" else "update", resource_type)
        current = known if known is not None else self.locked_state(resource_type, resource_id)
        if if_match is not None and (current is None or current.version_id != if_match or current.deleted):
            found = "does not exist" if current is None else f"is at version {current.version_id}"
            raise PreconditionFailed(
                f"If-Match expected version {if_match} of {resource_type}/{resource_id}, but it {found}"
            )
        event = self._before_write(resource_type, resource_id, method, resource,
                                   None if current is None else current.content)
        if current is None:
            stored = self._store_new_if_absent(resource, resource_type, resource_id, method=method)
            if stored is None:  # another transaction created the same id after our check: update it
                return self.update(resource_type, resource_id, resource, if_match=if_match, method=method)
            self._after_write(event)
            return WriteResult(stored, created=True)
        stored = self._store_next(resource, resource_type, resource_id, expected_version=current.version_id,
                                  method=method)
        self._after_write(event)
        return WriteResult(stored, created=current.deleted)

    def delete(self, resource_type: str, resource_id: str) -> StoredResource | None:
        """Delete; returns the deletion version, or None when there was nothing to delete."""
        self.authorize("delete", resource_type)
        current = self.current_version(resource_type, resource_id, lock=True)
        if current is None or current[1]:
            return None
        previous = self.current_content(resource_type, resource_id)
        event = self._before_write(resource_type, resource_id, "DELETE", None, previous)
        now = self.clock()
        seq = self._insert_version(resource_type, resource_id, current[0] + 1, now, "DELETE", None)
        stored = StoredResource(resource_type, resource_id, current[0] + 1, now, None, seq)
        self._move_pointer(stored, expected_version=current[0], deleted=True)
        self._clear_index(resource_type, [resource_id])
        self._after_write(event)
        return stored

    def lock_match_keys(self, keys: list[tuple[str, str]]) -> None:
        """:meth:`lock_match_key` for many (type, query) pairs in one statement, in a fixed
        order so that two Bundles locking overlapping keys cannot deadlock."""
        if not self._postgres or not keys:
            return
        hashes = sorted({_match_key(t, q) for t, q in keys})
        values = sa.values(sa.column("k", sa.BigInteger), name="keys").data([(h,) for h in hashes])
        self.conn.execute(sa.select(sa.func.pg_advisory_xact_lock(values.c.k)).select_from(values))

    def lock_match_key(self, resource_type: str, query: str) -> None:
        """Serialise conditional writes with the same match criteria (race-free If-None-Exist).

        On PostgreSQL a transaction-scoped advisory lock on a hash of (type, sorted query);
        SQLite write transactions are already serial (BEGIN IMMEDIATE).
        """
        if not self._postgres:
            return
        self.conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_match_key(resource_type, query))))

    # -- internals -----------------------------------------------------------------------

    def _before_write(self, resource_type: str, resource_id: str, method: str, resource: dict[str, Any] | None,
                      previous: dict[str, Any] | None) -> WriteEvent | None:
        """Authorise the write, then let domain hooks refuse or complete it."""
        if not self.ctx.system:
            self.policy.check_write(self.ctx, resource_type, resource, previous)
        if not self.hooks.wants(resource_type):
            return None
        event = WriteEvent(self, resource_type, resource_id, method, resource, previous)
        self.hooks.run_before(event)
        return event

    def _after_write(self, event: WriteEvent | None) -> None:
        if event is not None:
            self.hooks.run_after(event)

    def _stamp(self, resource: dict[str, Any], resource_id: str, version_id: int, now: datetime) -> None:
        """Give the JSON to store its id and meta.versionId / meta.lastUpdated."""
        resource["id"] = resource_id
        resource["meta"] = {**(resource.get("meta") or {}), "versionId": str(version_id),
                            "lastUpdated": fhir_instant(now)}
        self._reference_cache.pop((resource["resourceType"], resource_id), None)

    def _store_new(self, items: list[tuple[dict[str, Any], str]],
                   indexed: list[IndexRows] | None = None) -> list[StoredResource]:
        """Version 1, pointer and index rows of each resource (ids assigned), in as few
        statements as the database allows: one on PostgreSQL (``pg_writes``)."""
        if not items:
            return []
        now = self.clock()
        for resource, resource_id in items:
            self._stamp(resource, resource_id, 1, now)
        if self._postgres:
            versions = [pg_writes.NewVersion(r["resourceType"], i, "POST", orjson.dumps(r)) for r, i in items]
            seqs = pg_writes.create(self.conn, versions, now,
                                    self._index_rows([(r["resourceType"], i, r) for r, i in items], indexed))
            # seq 0: the create is held back until the transaction's end (pg_writes.create)
            return [StoredResource(v.resource_type, v.id, 1, now, v.content, seqs.get((v.resource_type, v.id), 0))
                    for v in versions]
        rows = [{"resource_type": r["resourceType"], "id": i, "version_id": 1, "last_updated": now,
                 "method": "POST", "deleted": False, "content": r} for r, i in items]
        seqs = self.conn.execute(V.insert().returning(V.c.seq, sort_by_parameter_order=True), rows).scalars().all()
        stored = [StoredResource(row["resource_type"], row["id"], 1, now, orjson.dumps(row["content"]), seq)
                  for row, seq in zip(rows, seqs, strict=True)]
        self.conn.execute(R.insert(), [
            {"resource_type": s.resource_type, "id": s.id, "version_id": 1, "seq": s.seq, "created_seq": s.seq,
             "last_updated": now, "deleted": False} for s in stored])
        self._insert_index_rows([(s.resource_type, s.id, r) for s, (r, _) in zip(stored, items)], indexed)
        return stored

    def _store_new_if_absent(self, resource: dict[str, Any], resource_type: str, resource_id: str, *,
                             method: str) -> StoredResource | None:
        """Version 1 of a resource at an id the caller chose (PUT); None, and nothing written,
        when another transaction created the id since this one looked (PostgreSQL; SQLite
        write transactions are serial, so there it cannot happen)."""
        now = self.clock()
        self._stamp(resource, resource_id, 1, now)
        if not self._postgres:
            stored = self._write_version(resource, resource_type, resource_id, version_id=1, method=method, now=now)
            self._insert_pointer(stored)
            self._index(resource_type, resource_id, resource, replace=False)
            return stored
        content = orjson.dumps(resource)
        seq = pg_writes.create_if_absent(self.conn, pg_writes.NewVersion(resource_type, resource_id, method, content),
                                         now, self._index_rows([(resource_type, resource_id, resource)]))
        return None if seq is None else StoredResource(resource_type, resource_id, 1, now, content, seq)

    def _store_next(self, resource: dict[str, Any], resource_type: str, resource_id: str, *,
                    expected_version: int, method: str) -> StoredResource:
        """The next version of a resource whose row this transaction has locked: version,
        pointer and index rows (one statement on PostgreSQL)."""
        now = self.clock()
        version_id = expected_version + 1
        self._stamp(resource, resource_id, version_id, now)
        if self._postgres:
            content = orjson.dumps(resource)
            seq, moved = pg_writes.update(
                self.conn, pg_writes.NewVersion(resource_type, resource_id, method, content),
                version_id=version_id, expected_version=expected_version, last_updated=now,
                index_rows=self._index_rows([(resource_type, resource_id, resource)]))
            if not moved:
                raise PreconditionFailed(f"{resource_type}/{resource_id} was changed concurrently; retry")
            return StoredResource(resource_type, resource_id, version_id, now, content, seq)
        stored = self._write_version(resource, resource_type, resource_id, version_id=version_id, method=method,
                                     now=now)
        self._move_pointer(stored, expected_version=expected_version, deleted=False)
        self._index(resource_type, resource_id, resource, replace=True)
        return stored

    def _write_version(self, resource: dict[str, Any], resource_type: str, resource_id: str, *,
                       version_id: int, method: str, now: datetime) -> StoredResource:
        """SQLite: the version row of a resource :meth:`_stamp` has prepared."""
        seq = self._insert_version(resource_type, resource_id, version_id, now, method, resource)
        return StoredResource(resource_type, resource_id, version_id, now, orjson.dumps(resource), seq)

    def _insert_version(self, resource_type: str, resource_id: str, version_id: int, now: datetime,
                        method: str, content: dict[str, Any] | None) -> int:
        self._reference_cache.pop((resource_type, resource_id), None)
        return self.conn.execute(
            V.insert().returning(V.c.seq),
            {"resource_type": resource_type, "id": resource_id, "version_id": version_id,
             "last_updated": now, "method": method, "deleted": content is None, "content": content},
        ).scalar_one()

    def _insert_pointer(self, stored: StoredResource) -> None:
        self.conn.execute(R.insert(), {"resource_type": stored.resource_type, "id": stored.id,
                                       "version_id": stored.version_id, "seq": stored.seq,
                                       "created_seq": stored.seq, "last_updated": stored.last_updated,
                                       "deleted": False})

    def _move_pointer(self, stored: StoredResource, *, expected_version: int, deleted: bool) -> None:
        result = self.conn.execute(
            R.update()
            .where(R.c.resource_type == stored.resource_type, R.c.id == stored.id,
                   R.c.version_id == expected_version)
            .values(version_id=stored.version_id, seq=stored.seq, last_updated=stored.last_updated,
                    deleted=deleted)
        )
        if result.rowcount != 1:  # only reachable on SQLite-less races; PostgreSQL holds a row lock
            raise PreconditionFailed(f"{stored.reference} was changed concurrently; retry")

    def _index(self, resource_type: str, resource_id: str, resource: dict[str, Any], *, replace: bool) -> None:
        if replace:
            self._clear_index(resource_type, [resource_id])
        self._insert_index_rows([(resource_type, resource_id, resource)])

    def _index_rows(self, resources: list[tuple[str, str, dict[str, Any]]],
                    indexed: list[IndexRows] | None = None) -> list[tuple[str, str, IndexRows]]:
        """The index rows of each resource (``indexed``, when computed already), with its
        type and id; the token sets they name that may not exist yet are written first
        (``token_sets``; on PostgreSQL held back with the rows, ``pg_writes.write_token_sets``)."""
        sets: token_sets.TokenSets = {}
        owned = []
        for n, (resource_type, resource_id, resource) in enumerate(resources):
            rows = index_resource(resource) if indexed is None else indexed[n]
            token_sets.share(resource_type, rows, sets)
            owned.append((resource_type, resource_id, rows))
        if self._postgres:
            pg_writes.write_token_sets(self.conn, sets)
        else:
            self._write_token_sets(sets)
        return owned

    def _write_token_sets(self, sets: token_sets.TokenSets) -> None:
        """SQLite: write transactions take turns, so a set is either there or written here."""
        for name, rows in sets.items():
            if self.conn.exec_driver_sql(_SQLITE_NEW_SET, (name,)).rowcount == 1:
                self.conn.exec_driver_sql(_SQLITE_SET_ROW, [(name, r["param"], r["system"], r["code"], r["text"])
                                                            for r in rows])

    def _insert_index_rows(self, resources: list[tuple[str, str, dict[str, Any]]],
                           indexed: list[IndexRows] | None = None) -> None:
        """SQLite (PostgreSQL writes its index rows with the versions, see ``pg_writes``):
        one executemany per index table for all the given resources."""
        batches = _index_batches(self._index_rows(resources, indexed))
        for attribute, table in _INDEX_TARGETS:
            if batches[attribute]:
                # Plain tuples through the driver: SQLAlchemy's executemany processed every
                # row's parameters again (a seventh of a bulk load's CPU) for columns that need
                # no conversion at all (text and numbers).
                self.conn.exec_driver_sql(_sqlite_insert(table), batches[attribute])

    def _clear_index(self, resource_type: str, resource_ids: list[str]) -> None:
        if self._postgres:
            pg_writes.clear_index(self.conn, resource_type, resource_ids)
            return
        for _, table in _INDEX_TARGETS:
            self.conn.execute(
                table.delete().where(table.c.resource_type == resource_type,
                                     table.c.resource_id.in_(resource_ids))
            )


def _match_key(resource_type: str, query: str) -> int:
    """A signed 64-bit advisory-lock key for conditional-write criteria (order-insensitive)."""
    canonical = resource_type + "?" + "&".join(sorted(part for part in query.split("&") if part))
    return int.from_bytes(hashlib.blake2b(canonical.encode(), digest_size=8).digest(), "big", signed=True)


_SQLITE_NEW_SET = "INSERT OR IGNORE INTO token_set (digest) VALUES (?)"
_SQLITE_SET_ROW = "INSERT INTO token_set_row (digest, param, system, code, text) VALUES (?, ?, coalesce(?, ''), ?, ?)"


def _index_batches(owned: Iterable[tuple[str, str, IndexRows]]) -> dict[str, list[tuple[Any, ...]]]:
    """SQLite: the index rows of the resources, per index table (attribute of IndexRows), each
    a tuple in the table's column order (:func:`_sqlite_insert`), its owner's columns first."""
    batches: dict[str, list[tuple[Any, ...]]] = {attribute: [] for attribute, _ in _INDEX_TARGETS}
    for resource_type, resource_id, rows in owned:
        for attribute, table in _INDEX_TARGETS:
            entries = getattr(rows, attribute)
            if entries:
                names = _row_columns(table)
                batches[attribute].extend((resource_type, resource_id, *(entry.get(n) for n in names))
                                          for entry in entries)
    return batches


@functools.cache
def _row_columns(table: sa.Table) -> tuple[str, ...]:
    """An index table's columns after its owner's (resource_type, resource_id)."""
    return tuple(c.name for c in table.columns if c.name not in ("resource_type", "resource_id"))


@functools.cache
def _sqlite_insert(table: sa.Table) -> str:
    """INSERT of one index row, qmark placeholders; a column that is never NULL gets its
    default when the row has no value (``system`` "": none)."""
    names = ("resource_type", "resource_id", *_row_columns(table))
    values = ", ".join(f"coalesce(?, {pg_writes.NOT_NULL_DEFAULTS[n]})" if n in pg_writes.NOT_NULL_DEFAULTS else "?"
                       for n in names)
    return f"INSERT INTO {table.name} ({', '.join(names)}) VALUES ({values})"


def _require_type(resource: dict[str, Any]) -> str:
    resource_type = resource.get("resourceType")
    if not isinstance(resource_type, str) or not resource_type:
        raise BadRequest("the body has no resourceType", expression="resourceType")
    return resource_type


def _check_body_matches(resource: dict[str, Any], resource_type: str, resource_id: str) -> None:
    if resource.get("resourceType") != resource_type:
        raise BadRequest(
            f"the body is a {resource.get('resourceType')!r}, but the URL names {resource_type}",
            expression="resourceType",
        )
    body_id = resource.get("id")
    if body_id is None:
        raise BadRequest("an update must carry the resource id in the body (FHIR R4 3.1.0.4)", expression="id")
    if body_id != resource_id:
        raise BadRequest(f"the body's id {body_id!r} differs from the URL's id {resource_id!r}", expression="id")


def check_valid(resource: dict[str, Any], *, expected_type: str | None = None) -> None:
    """Raise 422 naming every problem, so that nothing invalid is ever written."""
    issues = validate_resource(resource, expected_type=expected_type)
    if issues:
        raise Unprocessable(issues=issues)


class ResourceStore:
    """Entry points for one interaction each; every one runs in its own transaction."""

    def __init__(self, engine: Engine, *, clock: Clock = utc_now, hooks: WriteHooks | None = None,
                 policy: AccessPolicy | None = None) -> None:
        self.engine = engine
        self.clock = clock
        self.hooks = hooks or WriteHooks()
        self.policy: AccessPolicy = policy or OpenPolicy()

    @contextmanager
    def write(self, ctx: AccessContext) -> Iterator[StoreTransaction]:
        with write_transaction(self.engine) as conn:
            tx = StoreTransaction(conn, ctx, self.clock, hooks=self.hooks, policy=self.policy)
            yield tx
            tx.finish()

    @contextmanager
    def read_only(self, ctx: AccessContext) -> Iterator[StoreTransaction]:
        with read_transaction(self.engine) as conn:
            yield StoreTransaction(conn, ctx, self.clock, hooks=self.hooks, policy=self.policy)

    def read(self, ctx: AccessContext, resource_type: str, resource_id: str) -> StoredResource:
        with self.read_only(ctx) as tx:
            return tx.read(resource_type, resource_id)

    def vread(self, ctx: AccessContext, resource_type: str, resource_id: str, version_id: int) -> StoredResource:
        with self.read_only(ctx) as tx:
            return tx.vread(resource_type, resource_id, version_id)

    def create(self, ctx: AccessContext, resource: dict[str, Any], *, if_none_exist: str | None = None) -> WriteResult:
        check_valid(resource)
        with self.write(ctx) as tx:
            return tx.create(resource, if_none_exist=if_none_exist)

    def update(self, ctx: AccessContext, resource_type: str, resource_id: str, resource: dict[str, Any], *,
               if_match: int | None = None, method: str = "PUT") -> WriteResult:
        _check_body_matches(resource, resource_type, resource_id)
        check_valid(resource, expected_type=resource_type)
        with self.write(ctx) as tx:
            return tx.update(resource_type, resource_id, resource, if_match=if_match, method=method)

    def conditional_update(self, ctx: AccessContext, resource_type: str, query: str,
                           resource: dict[str, Any]) -> WriteResult:
        """PUT [type]?criteria: no match creates, one match updates, several → 412."""
        check_valid(resource, expected_type=resource_type)
        with self.write(ctx) as tx:
            tx.lock_match_key(resource_type, query)
            matches = tx.find(resource_type, query)
            if len(matches) > 1:
                raise PreconditionFailed(f"'{query}' matches {len(matches)} {resource_type} resources")
            if matches:
                body_id = resource.get("id")
                if body_id is not None and body_id != matches[0]:
                    raise BadRequest(f"the body's id {body_id!r} differs from the matched {resource_type}/{matches[0]}",
                                     expression="id")
                resource["id"] = matches[0]
                return tx.update(resource_type, matches[0], resource)
            if resource.get("id"):
                return tx.update(resource_type, resource["id"], resource)
            return tx.create(resource)

    def patch(self, ctx: AccessContext, resource_type: str, resource_id: str,
              apply: Callable[[dict[str, Any]], dict[str, Any]], *, if_match: int | None = None) -> WriteResult:
        """Apply a patch function to the current version and store the result as a new version."""
        with self.write(ctx) as tx:
            current = tx.read(resource_type, resource_id)
            if if_match is not None and current.version_id != if_match:
                raise PreconditionFailed(
                    f"If-Match expected version {if_match} of {resource_type}/{resource_id}, "
                    f"but it is at version {current.version_id}"
                )
            patched = apply(current.as_dict())
            _check_body_matches(patched, resource_type, resource_id)
            check_valid(patched, expected_type=resource_type)
            return tx.update(resource_type, resource_id, patched, if_match=current.version_id, method="PATCH")

    def delete(self, ctx: AccessContext, resource_type: str, resource_id: str) -> StoredResource | None:
        with self.write(ctx) as tx:
            return tx.delete(resource_type, resource_id)

    def conditional_delete(self, ctx: AccessContext, resource_type: str, query: str) -> StoredResource | None:
        with self.write(ctx) as tx:
            matches = tx.find(resource_type, query)
            if len(matches) > 1:
                raise PreconditionFailed(f"'{query}' matches {len(matches)} {resource_type} resources")
            return tx.delete(resource_type, matches[0]) if matches else None

    def search(self, ctx: AccessContext, resource_type: str, params: list[tuple[str, str]], *,
               strict: bool = False, base_url: str) -> bytes:
        """A searchset Bundle (JSON bytes) for ``GET [type]?params``."""
        from service.fhir.search import execute_search, parse_search, searchset_bundle

        request = parse_search(resource_type, params, strict=strict)
        with self.read_only(ctx) as tx:
            tx.authorize("search", resource_type)
            page = execute_search(tx.conn, request, visible=tx.boundary, visible_key=tx.visibility_key())
        return searchset_bundle(page, base_url=base_url)

    def history(self, ctx: AccessContext, resource_type: str | None = None, resource_id: str | None = None, *,
                count: int = 50, before_seq: int | None = None, since: datetime | None = None) -> list[HistoryEntry]:
        """Versions newest first. Paged by ``before_seq`` (keyset on the change sequence)."""
        query = sa.select(V.c.resource_type, V.c.id, V.c.version_id, V.c.last_updated, V.c.seq, V.c.method,
                          _json_text(V.c.content))
        if resource_type is not None:
            query = query.where(V.c.resource_type == resource_type)
        if resource_id is not None:
            query = query.where(V.c.id == resource_id)
        if before_seq is not None:
            query = query.where(V.c.seq < before_seq)
        if since is not None:
            query = query.where(V.c.last_updated >= since)
        query = query.order_by(V.c.seq.desc()).limit(count)
        with self.read_only(ctx) as tx:
            tx.authorize("history", resource_type or "*")
            if resource_id is not None and resource_type is not None and not tx.may_see(resource_type, resource_id):
                raise NotFound(f"{resource_type}/{resource_id} is not known")
            if not tx.ctx.system:
                query = query.where(tx.visible(resource_type or "*", V.c.resource_type, V.c.id))
            rows = tx.conn.execute(query).all()
        return [
            HistoryEntry(StoredResource(r[0], r[1], r[2], _utc(r[3]), _to_bytes(r[6]), r[4]), r[5])
            for r in rows
        ]
