"""Database tables of the resource store and its search index.

``resource`` holds one row per logical resource pointing at its current version;
``resource_version`` holds every version's JSON exactly once (JSONB on PostgreSQL) and its
primary key ``seq`` is the store-wide, monotonic change sequence.

Search indexes follow HAPI's JPA layout: one table per parameter type, rows for the current
version only, replaced on every write. A search is an index seek, never a scan of JSON.
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field, SQLModel

# A 64-bit identity on PostgreSQL; SQLite only autoincrements an INTEGER PRIMARY KEY.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
# none_as_null: a deletion stores SQL NULL, not the JSON literal null.
Json = sa.JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")
UtcDateTime = sa.DateTime(timezone=True)


class ResourceRow(SQLModel, table=True):
    __tablename__ = "resource"
    __table_args__ = (
        sa.Index("ix_resource_type_updated", "resource_type", "last_updated"),
        sa.Index("ix_resource_type_seq", "resource_type", "seq"),
    )

    resource_type: str = Field(primary_key=True, max_length=64)
    id: str = Field(primary_key=True, max_length=64)
    version_id: int
    seq: int = Field(sa_type=sa.BigInteger)  # seq of the current version
    created_seq: int = Field(sa_type=sa.BigInteger)  # seq of version 1: pins search snapshots
    last_updated: datetime = Field(sa_type=UtcDateTime)
    deleted: bool = False


class ResourceVersion(SQLModel, table=True):
    __tablename__ = "resource_version"
    __table_args__ = (
        sa.UniqueConstraint("resource_type", "id", "version_id", name="uq_resource_version"),
        sa.Index("ix_version_type_seq", "resource_type", "seq"),
    )

    seq: int | None = Field(default=None, sa_column=sa.Column(BigId, primary_key=True, autoincrement=True))
    resource_type: str = Field(max_length=64)
    id: str = Field(max_length=64)
    version_id: int
    last_updated: datetime = Field(sa_type=UtcDateTime)
    method: str = Field(max_length=8)  # POST | PUT | PATCH | DELETE
    deleted: bool = False
    content: dict | None = Field(default=None, sa_column=sa.Column(Json, nullable=True))



#: Index tables have no primary key: nothing ever addresses one row, a resource's rows are
#: found and replaced through its owner index, and a surrogate key would cost every row
#: written a sequence step and an entry in one more b-tree. (The ORM wants a key to map a
#: class; it is told to use the owner's columns and never writes through the mapping.)
_NO_KEY = {"primary_key": ["resource_type", "resource_id", "param"]}


class TokenIndex(SQLModel, table=True):
    """token parameters: Identifier, Coding, CodeableConcept, code, boolean, ContactPoint."""

    __tablename__ = "idx_token"
    __table_args__ = (
        sa.Index("ix_token_lookup", "resource_type", "param", "code", "system"),
        sa.Index("ix_token_owner", "resource_type", "resource_id"),
    )

    __mapper_args__ = _NO_KEY

    resource_type: str = Field(max_length=64)
    resource_id: str = Field(max_length=64)
    param: str = Field(max_length=100)
    system: str = ""  # "" when the value has no system
    code: str | None = None
    text: str | None = None  # normalised display / text, for :text


class TokenSetIndex(SQLModel, table=True):
    """token parameters of the types whose token rows are shared (``service.fhir.token_sets``):
    the one set of token rows each resource has, by the digest that names the set."""

    __tablename__ = "idx_token_set"
    __table_args__ = (
        sa.Index("ix_token_set_lookup", "resource_type", "digest"),
        sa.Index("ix_token_set_owner", "resource_type", "resource_id"),
    )

    __mapper_args__ = {"primary_key": ["resource_type", "resource_id", "digest"]}

    resource_type: str = Field(max_length=64)
    resource_id: str = Field(max_length=64)
    digest: str = Field(max_length=32)


class TokenSet(SQLModel, table=True):
    """A set of token rows, named by the digest of its content; written once, never changed
    (two writers of the same new set: the second finds the name taken and writes nothing)."""

    __tablename__ = "token_set"

    digest: str = Field(primary_key=True, max_length=32)


class TokenSetRow(SQLModel, table=True):
    """The token rows of a set: the columns of ``idx_token`` with the set in place of the owner."""

    __tablename__ = "token_set_row"
    __table_args__ = (
        sa.Index("ix_token_set_row_lookup", "param", "code", "system"),
        sa.Index("ix_token_set_row_set", "digest"),
    )

    __mapper_args__ = {"primary_key": ["digest", "param", "system"]}

    digest: str = Field(max_length=32)
    param: str = Field(max_length=100)
    system: str = ""
    code: str | None = None
    text: str | None = None


class StringIndex(SQLModel, table=True):
    """string parameters. ``value`` is case- and accent-folded, ``exact`` as written."""

    __tablename__ = "idx_string"
    __table_args__ = (
        sa.Index("ix_string_lookup", "resource_type", "param", "value"),
        sa.Index("ix_string_owner", "resource_type", "resource_id"),
    )

    __mapper_args__ = _NO_KEY

    resource_type: str = Field(max_length=64)
    resource_id: str = Field(max_length=64)
    param: str = Field(max_length=100)
    value: str
    exact: str


class DateIndex(SQLModel, table=True):
    """date parameters as closed ranges [low, high] in epoch milliseconds (UTC)."""

    __tablename__ = "idx_date"
    __table_args__ = (
        sa.Index("ix_date_low", "resource_type", "param", "low"),
        sa.Index("ix_date_high", "resource_type", "param", "high"),
        sa.Index("ix_date_owner", "resource_type", "resource_id"),
    )

    __mapper_args__ = _NO_KEY

    resource_type: str = Field(max_length=64)
    resource_id: str = Field(max_length=64)
    param: str = Field(max_length=100)
    low: int = Field(sa_type=sa.BigInteger)
    high: int = Field(sa_type=sa.BigInteger)


class ReferenceIndex(SQLModel, table=True):
    """reference parameters. Local references fill target_type/target_id; others only url."""

    __tablename__ = "idx_reference"
    __table_args__ = (
        sa.Index("ix_reference_lookup", "resource_type", "param", "target_id", "target_type"),
        sa.Index("ix_reference_target", "target_type", "target_id"),
        sa.Index("ix_reference_owner", "resource_type", "resource_id"),
    )

    __mapper_args__ = _NO_KEY

    resource_type: str = Field(max_length=64)
    resource_id: str = Field(max_length=64)
    param: str = Field(max_length=100)
    target_type: str | None = Field(default=None, max_length=64)
    target_id: str | None = Field(default=None, max_length=64)
    url: str | None = None


class NumberIndex(SQLModel, table=True):
    """number parameters, with the range implied by the value's precision."""

    __tablename__ = "idx_number"
    __table_args__ = (
        sa.Index("ix_number_lookup", "resource_type", "param", "value"),
        sa.Index("ix_number_owner", "resource_type", "resource_id"),
    )

    __mapper_args__ = _NO_KEY

    resource_type: str = Field(max_length=64)
    resource_id: str = Field(max_length=64)
    param: str = Field(max_length=100)
    value: float
    low: float
    high: float


class QuantityIndex(SQLModel, table=True):
    __tablename__ = "idx_quantity"
    __table_args__ = (
        sa.Index("ix_quantity_lookup", "resource_type", "param", "value"),
        sa.Index("ix_quantity_owner", "resource_type", "resource_id"),
    )

    __mapper_args__ = _NO_KEY

    resource_type: str = Field(max_length=64)
    resource_id: str = Field(max_length=64)
    param: str = Field(max_length=100)
    value: float
    low: float
    high: float
    system: str = ""
    code: str | None = None


class UriIndex(SQLModel, table=True):
    __tablename__ = "idx_uri"
    __table_args__ = (
        sa.Index("ix_uri_lookup", "resource_type", "param", "value"),
        sa.Index("ix_uri_owner", "resource_type", "resource_id"),
    )

    __mapper_args__ = _NO_KEY

    resource_type: str = Field(max_length=64)
    resource_id: str = Field(max_length=64)
    param: str = Field(max_length=100)
    value: str


class OutboxEvent(SQLModel, table=True):
    """Events for receivers (referral notifications, escalations ...), written in the same
    transaction as the change that caused them, so none is lost; delivery marks them done."""

    __tablename__ = "outbox"
    __table_args__ = (sa.Index("ix_outbox_pending", "delivered_at", "seq"),)

    seq: int | None = Field(default=None, sa_column=sa.Column(BigId, primary_key=True, autoincrement=True))
    topic: str = Field(max_length=100)
    payload: dict = Field(sa_column=sa.Column(Json, nullable=False))
    created_at: datetime = Field(sa_type=UtcDateTime)
    delivered_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    attempts: int = 0


INDEX_TABLES = (TokenIndex, StringIndex, DateIndex, ReferenceIndex, NumberIndex, QuantityIndex, UriIndex,
                TokenSetIndex)
#: (attribute of ``indexing.IndexRows``, table) for every index table.
INDEX_TARGETS: tuple[tuple[str, sa.Table], ...] = tuple(
    (attribute, model.__table__)  # type: ignore[attr-defined]
    for attribute, model in zip(("tokens", "strings", "dates", "references", "numbers", "quantities", "uris",
                                 "token_sets"), INDEX_TABLES, strict=True))
metadata = SQLModel.metadata
