"""``yilian capacity ...``: release and hold expiry by hand or as a standalone scheduler, the
report, and a check of the policy file."""

from __future__ import annotations

import argparse
import json
import sys
import time


def add_commands(subparsers) -> None:  # type: ignore[no-untyped-def]
    capacity = subparsers.add_parser("capacity", help="reserved capacity for family doctors (R20-R23)")
    commands = capacity.add_subparsers(title="capacity commands")

    release = commands.add_parser("release", help="release due reserved capacity (R23) and expire holds")
    release.add_argument("--now", action="store_true", help="run once now and exit (default: keep running)")
    release.add_argument("--at", default=None, help="run once as if it were this instant (testing, catch-up)")
    release.add_argument("--interval", type=float, default=30.0, help="seconds between runs when not --now")
    release.set_defaults(run=_release)

    report = commands.add_parser("report", help="reserved-capacity report of a hospital or department for a day")
    report.add_argument("--organization", required=True, help="Organization/<id> or HealthcareService/<id>")
    report.add_argument("--date", required=True, help="YYYY-MM-DD")
    report.set_defaults(run=_report)

    check = commands.add_parser("check-policy", help="validate mappings/capacity-policy.json (or FILE)")
    check.add_argument("file", nargs="?", default=None)
    check.set_defaults(run=_check_policy)


def _store():  # type: ignore[no-untyped-def]
    from service.app import create_app

    return create_app().state.store


def _release(args: argparse.Namespace) -> int:
    from service.capacity._fhir import parse_instant
    from service.capacity.release import Scheduler, run_once

    store = _store()
    if args.now or args.at:
        now = parse_instant(args.at, "--at") if args.at else None
        try:
            print(run_once(store, now))
        finally:
            store.engine.dispose()
        return 0
    scheduler = Scheduler(store, interval=args.interval)
    while True:  # a standalone scheduler: the lease keeps it from racing the app's own
        summary = scheduler.tick()
        if summary is not None and (summary.released or summary.expired_holds):
            print(summary, flush=True)
        time.sleep(args.interval)


def _report(args: argparse.Namespace) -> int:
    from datetime import date

    from service.capacity.report import capacity_report

    store = _store()
    try:
        with store.engine.connect() as conn:
            print(json.dumps(capacity_report(conn, args.organization, date.fromisoformat(args.date)),
                             ensure_ascii=False, indent=2))
    finally:
        store.engine.dispose()
    return 0


def _check_policy(args: argparse.Namespace) -> int:
    from pathlib import Path

    from service.capacity.policy import POLICY_FILE, PolicyError, load_policy_file

    try:
        policy = load_policy_file(Path(args.file) if args.file else POLICY_FILE)
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(json.dumps(policy.as_json(), indent=2))
    return 0
