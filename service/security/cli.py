"""``yilian clients``, ``yilian users``, ``yilian keys`` and ``yilian demo-token``.

They work on the database directly (``YILIAN_DATABASE_URL``), so they run where the server
runs; the admin API (/admin) offers the same over HTTP with a ``yilian/admin`` token.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shlex
import sys
from pathlib import Path
from typing import Any


def add_commands(subparsers: Any) -> None:
    clients = subparsers.add_parser("clients", help="OAuth clients").add_subparsers(title="clients commands")
    add = clients.add_parser("add", help="register a client; prints its client_id (and secret, once)")
    add.add_argument("--name", required=True)
    add.add_argument("--org", required=True, help="Organization/<id> the client acts for")
    add.add_argument("--scopes", required=True, help='e.g. "system/*.cruds" or "user/*.rs launch/patient"')
    how = add.add_mutually_exclusive_group(required=True)
    how.add_argument("--jwks", type=Path, help="JWK Set file with the client's public keys (private_key_jwt)")
    how.add_argument("--jwks-url", help="URL of the client's JWK Set (private_key_jwt)")
    how.add_argument("--secret", action="store_true", help="generate a client secret (client_secret_basic)")
    how.add_argument("--public", action="store_true", help="a public app: authorization code + PKCE only")
    add.add_argument("--redirect-uri", action="append", default=[], help="for the authorization code grant")
    add.add_argument("--grant-type", action="append", default=None,
                     choices=["authorization_code", "refresh_token", "client_credentials"])
    add.add_argument("--client-id", default=None, help="choose the client_id (default: generated)")
    add.set_defaults(run=_clients_add)
    listing = clients.add_parser("list", help="list clients")
    listing.set_defaults(run=_clients_list)
    disable = clients.add_parser("disable", help="disable a client (its tokens stop within seconds)")
    disable.add_argument("client_id")
    disable.set_defaults(run=_clients_disable)

    users = subparsers.add_parser("users", help="referral-desk users").add_subparsers(title="users commands")
    user_add = users.add_parser("add", help="add a desk user (prints a generated password once)")
    user_add.add_argument("--username", required=True)
    user_add.add_argument("--org", required=True, help="Organization/<id> the user works for")
    user_add.add_argument("--practitioner-role", default=None, help="PractitionerRole/<id>")
    user_add.add_argument("--name", default="", help="display name")
    user_add.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    user_add.set_defaults(run=_users_add)
    user_list = users.add_parser("list", help="list desk users")
    user_list.set_defaults(run=_users_list)
    for name, helptext, run in (("unlock", "clear a lockout", _users_unlock),
                                ("disable", "disable a user (sessions end, tokens stop)", _users_disable)):
        command = users.add_parser(name, help=helptext)
        command.add_argument("username")
        command.set_defaults(run=run)

    keys = subparsers.add_parser("keys", help="token-signing keys").add_subparsers(title="keys commands")
    rotate = keys.add_parser("rotate", help="start signing with a new key (the previous stays published)")
    rotate.add_argument("--retire-previous", action="store_true",
                        help="unpublish older keys at once (after a compromise: their tokens stop verifying)")
    rotate.set_defaults(run=_keys_rotate)

    demo = subparsers.add_parser("demo-token", help="print an access token and a curl line for a demo client")
    demo.add_argument("--client", default="demo-his-yq1", help="client_id or name of a demo client")
    demo.add_argument("--scope", default=None, help="narrower scopes than the client's (default: all of them)")
    demo.set_defaults(run=_demo_token)


def _runtime():  # type: ignore[no-untyped-def]
    from service.config import get_settings
    from service.fhir.db import create_engine
    from service.security.oauth.runtime import SecurityRuntime

    settings = get_settings()
    return SecurityRuntime.create(settings, create_engine(settings.database_url))


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _clients_add(args: argparse.Namespace) -> int:
    from service.security.clients import ClientError

    runtime = _runtime()
    jwks = None
    if args.jwks is not None:
        try:
            jwks = json.loads(args.jwks.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            return _fail(f"cannot read the JWK Set {args.jwks}: {exc}")
    try:
        client, secret = runtime.clients.create(
            name=args.name, organization=args.org, scopes=args.scopes, secret=args.secret, jwks=jwks,
            jwks_url=args.jwks_url, public=args.public, redirect_uris=args.redirect_uri,
            grant_types=args.grant_type, client_id=args.client_id)
    except ClientError as exc:
        return _fail(str(exc))
    print(f"client_id: {client.client_id}")
    if secret:
        print(f"client_secret: {secret}")
        print("(the secret is shown this once; only its hash is stored)")
    return 0


def _clients_list(args: argparse.Namespace) -> int:
    for client in _runtime().clients.list():
        state = "disabled" if client.disabled else client.auth_method
        print(f"{client.client_id}\t{client.organization}\t{state}\t{' '.join(client.scopes)}\t{client.name}")
    return 0


def _clients_disable(args: argparse.Namespace) -> int:
    if not _runtime().clients.disable(args.client_id):
        return _fail(f"no enabled client {args.client_id}")
    print(f"disabled {args.client_id}")
    return 0


def _users_add(args: argparse.Namespace) -> int:
    from service.security.users import UserError

    generated = not args.password_stdin
    password = secrets.token_urlsafe(12) if generated else sys.stdin.readline().rstrip("\n")
    try:
        user = _runtime().users.create(args.username, password, organization=args.org,
                                       practitioner_role=args.practitioner_role, display_name=args.name)
    except UserError as exc:
        return _fail(str(exc))
    print(f"user: {user.username} ({user.organization})")
    if generated:
        print(f"password: {password}")
        print("(shown this once)")
    return 0


def _users_list(args: argparse.Namespace) -> int:
    for user in _runtime().users.list():
        state = "disabled" if user.disabled else ("locked" if user.locked_until else "active")
        print(f"{user.username}\t{user.organization}\t{user.practitioner_role or '-'}\t{state}\t{user.display_name}")
    return 0


def _users_unlock(args: argparse.Namespace) -> int:
    if not _runtime().users.unlock(args.username):
        return _fail(f"no user {args.username}")
    print(f"unlocked {args.username}")
    return 0


def _users_disable(args: argparse.Namespace) -> int:
    if not _runtime().users.disable(args.username):
        return _fail(f"no enabled user {args.username}")
    print(f"disabled {args.username}")
    return 0


def _keys_rotate(args: argparse.Namespace) -> int:
    kid = _runtime().keys.rotate(retire_previous=args.retire_previous)
    print(f"signing with key {kid}")
    return 0


def _demo_token(args: argparse.Namespace) -> int:
    from service.security.scopes import grantable

    runtime = _runtime()
    client = runtime.clients.get(args.client) or next(
        (c for c in runtime.clients.list() if c.name == args.client and not c.disabled), None)
    if client is None:
        return _fail(f"no client {args.client!r}: load the demo first (yilian demo-data)")
    if not client.demo:
        return _fail(f"{client.client_id} is not a demo client; real clients get tokens at {runtime.urls.token}")
    scope = grantable(args.scope, client.scopes, kind="backend")
    if not scope:
        return _fail(f"none of the scopes {args.scope!r} is registered for {client.client_id}")
    token, expires_in = runtime.tokens.issue_access_token(client_id=client.client_id, scope=scope,
                                                          organization=client.organization, kind="backend")
    print(f"# {client.client_id} ({client.organization}), scope {' '.join(scope)}, valid {expires_in} s")
    print(f"export TOKEN={token}")
    url = shlex.quote(runtime.urls.fhir_base + "/Organization?_count=3")
    print(f'curl -s -H "Authorization: Bearer $TOKEN" {url}')
    return 0
