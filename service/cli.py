"""The ``yilian`` command: serve, migrate, load data."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from service.capacity import cli as capacity_cli
from service.config import get_settings
from service.referral import cli as referral_cli


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=get_settings().log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    return int(args.run(args) or 0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="yilian", description="Yilian (医联) FHIR R4 gateway for medical alliances")
    commands = parser.add_subparsers(title="commands")

    serve = commands.add_parser("serve", help="serve FHIR at {host}:{port}/fhir")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1)
    serve.set_defaults(run=_serve)

    db = commands.add_parser("db", help="database schema").add_subparsers(title="db commands")
    upgrade = db.add_parser("upgrade", help="migrate the database to the latest schema")
    upgrade.add_argument("revision", nargs="?", default="heads")
    upgrade.set_defaults(run=_db_upgrade)

    demo = commands.add_parser("demo-data", help="load the demo alliance (idempotent)")
    demo.add_argument("--if-empty", action="store_true", help="only when the database holds no resources yet")
    demo.set_defaults(run=_demo_data)

    load = commands.add_parser("load", help="POST transaction/batch Bundles or NDJSON files to a server")
    load.add_argument("paths", nargs="+", type=Path)
    load.add_argument("--base-url", default=None, help="FHIR base (default: YILIAN_BASE_URL)")
    load.add_argument("--state-file", type=Path, default=None, help="record finished files here to resume later")
    load.add_argument("--concurrency", type=int, default=4)
    load.set_defaults(run=_load)

    openapi = commands.add_parser("openapi", help="write the OpenAPI document of the app")
    openapi.add_argument("output", type=Path, nargs="?", default=Path("openapi/openapi.json"))
    openapi.set_defaults(run=_openapi)
    from service.security.cli import add_commands as add_security_commands; add_security_commands(commands)  # noqa: E702
    capacity_cli.add_commands(commands)
    referral_cli.add_commands(commands)
    from service.security.audit_cli import add_commands as add_audit_commands; add_audit_commands(commands)  # noqa: E702
    return parser


def _serve(args: argparse.Namespace) -> int:
    from service.serve import serve

    serve("service.main:app", host=args.host, port=args.port, workers=args.workers,
          log_level=get_settings().log_level, proxy_headers=True)
    return 0


def _db_upgrade(args: argparse.Namespace) -> int:
    from service.migrate import upgrade

    upgrade(get_settings().database_url, args.revision)
    return 0


def _demo_data(args: argparse.Namespace) -> int:
    from service.seed import load_demo_data

    loaded = load_demo_data(get_settings().database_url, if_empty=args.if_empty)
    print(f"demo data: {loaded} resources written" if loaded else "demo data: database not empty, nothing loaded")
    from service.security.demo_clients import seed_demo_clients; seed_demo_clients(get_settings())  # noqa: E702
    return 0


def _load(args: argparse.Namespace) -> int:
    from service.loader import load_paths

    summary = load_paths(list(args.paths), (args.base_url or get_settings().base_url).rstrip("/"),
                         state_file=args.state_file, concurrency=args.concurrency)
    print(summary.report() if hasattr(summary, "report") else summary, file=sys.stderr)
    return 1 if summary.failures else 0


def _openapi(args: argparse.Namespace) -> int:
    from service.openapi import write_openapi

    write_openapi(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
