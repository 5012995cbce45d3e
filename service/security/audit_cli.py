"""``yilian audit drain`` and ``yilian audit purge``: the audit queue and retention."""

from __future__ import annotations

import argparse
from typing import Any


def add_commands(subparsers: Any) -> None:
    audit = subparsers.add_parser("audit", help="audit trail: drain the queue, purge by retention")
    commands = audit.add_subparsers(title="audit commands")

    drain = commands.add_parser("drain", help="store queued AuditEvents and Provenances as resources now")
    drain.set_defaults(run=_drain)

    purge = commands.add_parser("purge", help="delete AuditEvents older than the retention "
                                              "(YILIAN_AUDIT_RETENTION_DAYS, default 180)")
    purge.add_argument("--days", type=int, default=None, help="retention in days (default: the setting)")
    purge.set_defaults(run=_purge)


def _drain(args: argparse.Namespace) -> int:
    from service.config import get_settings
    from service.fhir.db import create_engine
    from service.fhir.store import ResourceStore
    from service.security.audit import drain

    engine = create_engine(get_settings().database_url)
    try:
        print(f"audit: {drain(ResourceStore(engine))} queued AuditEvents and Provenances stored")
    finally:
        engine.dispose()
    return 0


def _purge(args: argparse.Namespace) -> int:
    from service.config import get_settings
    from service.fhir.db import create_engine
    from service.security.audit import purge

    settings = get_settings()
    days = args.days if args.days is not None else settings.audit_retention_days
    engine = create_engine(settings.database_url)
    try:
        print(f"audit: {purge(engine, days=days)} AuditEvents older than {days} days purged")
    finally:
        engine.dispose()
    return 0
