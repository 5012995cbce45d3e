"""The audit queue: AuditEvents and Provenances, durable before anything is acknowledged.

No request should wait for whole AuditEvent and Provenance resources to be written and indexed,
yet no audit record may be lost (PIPL Art. 55, MLPS level 3). So a write appends its records
here inside its own transaction (they commit and roll back with it), and a read appends its
AuditEvent here in a short transaction shared by every request that finished meanwhile (group
commit) before it answers. A drain worker turns queued rows into resources later, in
transactions that create the resources and delete their rows together (exactly once).
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from service.fhir.tables import BigId, Json, UtcDateTime


class AuditQueueEntry(SQLModel, table=True):
    __tablename__ = "audit_queue"

    seq: int | None = Field(default=None, sa_column=sa.Column(BigId, primary_key=True, autoincrement=True))
    queued_at: datetime = Field(sa_type=UtcDateTime)
    resource: dict = Field(sa_column=sa.Column(Json, nullable=False))  # an AuditEvent or Provenance, ready to store
