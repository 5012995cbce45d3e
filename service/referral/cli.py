"""``yilian referral ...``: the referral workflow from the command line.

``yilian referral sweep [--now INSTANT]`` flags referral Tasks past their SLA deadline and
escalates them to the alliance referral desk (R31), exactly like the in-app sweep; safe to
run from cron on every node at once.
"""

from __future__ import annotations

import argparse
from datetime import datetime


def add_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    referral = subparsers.add_parser("referral", help="two-way referral workflow").add_subparsers(
        title="referral commands")
    sweep = referral.add_parser("sweep", help="flag overdue referral Tasks and escalate them to the referral desk")
    sweep.add_argument("--now", default=None, help="sweep as of this instant (ISO 8601 with zone); default: now")
    sweep.set_defaults(run=_sweep)


def _sweep(args: argparse.Namespace) -> int:
    from service.config import get_settings
    from service.fhir.db import create_engine
    from service.fhir.hooks import WriteHooks
    from service.fhir.store import ResourceStore
    from service.referral.hooks import register
    from service.referral.policy import load_config
    from service.referral.sla import sweep

    now = None
    if args.now:
        now = datetime.fromisoformat(args.now)
        if now.tzinfo is None:
            raise SystemExit("--now needs a time zone, e.g. 2026-03-01T08:00:00+08:00")
    config = load_config()
    hooks = WriteHooks()
    register(hooks, config)
    engine = create_engine(get_settings().database_url)
    try:
        report = sweep(ResourceStore(engine, hooks=hooks), config.policy, now=now)
    finally:
        engine.dispose()
    print(report.summary())
    for task in report.escalated:
        print(f"escalated {task}")
    return 0
