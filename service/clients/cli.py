"""``lethe clients create | list | rotate | revoke``: the API's callers, managed by an operator on the
database (LETHE_DATABASE_URL). A token is printed once, at create and rotate; only its digest is stored.

    lethe clients create NAME --tenant T --scope S [--scope S ...]   (or --scopes S,S,...)
    lethe clients list
    lethe clients rotate NAME
    lethe clients revoke NAME

``--token-only`` prints the bare token (for scripts: ``TOKEN=$(lethe clients create ... --token-only)``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_parser(subparsers: Any) -> None:
    from service.clients.service import DEFAULT_TENANT, SCOPES

    clients = subparsers.add_parser(
        "clients", help="API clients: create, list, rotate, revoke (bearer tokens)"
    )
    commands = clients.add_subparsers(dest="clients_command", required=True, metavar="CLIENTS_COMMAND")
    scope_help = "; ".join(f"{scope}: {meaning}" for scope, meaning in SCOPES.items())

    create = commands.add_parser("create", help="add a client and print its token (once)")
    create.add_argument("name", help="unique name, shown in the audit trail as the actor")
    create.add_argument("--tenant", default=DEFAULT_TENANT, help=f"its tenant (default {DEFAULT_TENANT})")
    create.add_argument("--scope", action="append", default=[], help=f"repeatable. {scope_help}")
    create.add_argument("--scopes", default="", help="comma-separated, as an alternative to --scope")
    create.add_argument("--token-only", action="store_true", help="print only the token")
    create.set_defaults(handler=_create)

    listing = commands.add_parser("list", help="every client: tenant, scopes, state (never a token)")
    listing.set_defaults(handler=_list)

    rotate = commands.add_parser("rotate", help="a new token for the client; the old one stops working")
    rotate.add_argument("name")
    rotate.add_argument("--token-only", action="store_true", help="print only the token")
    rotate.set_defaults(handler=_rotate)

    revoke = commands.add_parser("revoke", help="the client's token stops working (the client stays listed)")
    revoke.add_argument("name")
    revoke.set_defaults(handler=_revoke)


def _session_factory() -> Any:
    from service.core.database import make_engine, make_session_factory
    from service.core.settings import Settings

    return make_session_factory(make_engine(Settings().database_url))


def _print_token(issued: Any, token_only: bool, verb: str) -> None:
    if token_only:
        print(issued.token)
        return
    client = issued.client
    print(f"client {client.name} (tenant {client.tenant}, scopes {','.join(client.scopes)}) {verb}")
    print(f"token (shown once; send it as 'Authorization: Bearer <token>'):\n{issued.token}")


def _fail(message: str) -> int:
    print(f"lethe clients: {message}", file=sys.stderr)
    return 2


def _create(args: argparse.Namespace) -> int:
    from service.clients.service import ClientError, create_client

    scopes = [*args.scope, *(part.strip() for part in args.scopes.split(",") if part.strip())]
    try:
        with _session_factory().begin() as session:
            issued = create_client(session, args.name, args.tenant, scopes)
            _print_token(issued, args.token_only, "created")
    except ClientError as exc:
        return _fail(str(exc))
    return 0


def _list(_args: argparse.Namespace) -> int:
    from service.clients.service import list_clients

    with _session_factory()() as session:
        rows = list_clients(session)
        print(f"{'NAME':30} {'TENANT':20} {'STATE':8} SCOPES")
        for client in rows:
            state = "revoked" if client.revoked_at else "active"
            print(f"{client.name:30} {client.tenant:20} {state:8} {','.join(client.scopes)}")
    return 0


def _rotate(args: argparse.Namespace) -> int:
    from service.clients.service import ClientError, rotate

    try:
        with _session_factory().begin() as session:
            _print_token(rotate(session, args.name), args.token_only, "rotated")
    except ClientError as exc:
        return _fail(str(exc))
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from service.clients.service import ClientError, revoke

    try:
        with _session_factory().begin() as session:
            client = revoke(session, args.name)
            print(f"client {client.name} revoked: its token no longer works")
    except ClientError as exc:
        return _fail(str(exc))
    return 0
