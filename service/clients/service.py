"""API clients: scopes, bearer tokens and their verification.

A token is ``lethe.<client id>.<secret>``: the id finds the client's row, the secret is checked against the
stored SHA-256 digest in constant time. The secret is 256 random bits, so a fast hash is enough (a slow KDF
protects guessable passwords, not random keys); the token itself is shown once, at creation or rotation.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy.orm import Session

from service.clients import repository
from service.clients.tables import ApiClient
from service.core.clock import utcnow
from service.core.database import new_id

TOKEN_PREFIX = "lethe"
DEFAULT_TENANT = "default"  # the tenant of what was registered before tenants existed
ADMIN = "admin"
# Every scope, with what it allows. ``admin`` holds every other one, inside its own tenant.
SCOPES: dict[str, str] = {
    "datasets:read": "read datasets and their samples",
    "datasets:write": "register datasets",
    "models:read": "read models, versions, checkpoints and audit reference sets",
    "models:write": "register models and build their audit reference sets",
    "deletions:read": "read deletion requests and their audit trails",
    "deletions:write": "file deletion requests",
    "jobs:read": "read jobs",
    "jobs:write": "cancel jobs",
    "reports:read": "download erasure reports and their signatures",
    "webhooks:read": "read webhook endpoints and their deliveries",
    "webhooks:write": "register and delete webhook endpoints",
    ADMIN: "every scope above, and verification of the whole audit trail",
}
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,99}$")
# Compared against when a token names no client, so that an unknown id costs what a wrong secret does.
_ABSENT_DIGEST = hashlib.sha256(b"no such client").hexdigest()


class ClientError(ValueError):
    """A client that cannot be created or changed as asked (the CLI prints the message)."""


@dataclass(frozen=True)
class Principal:
    """The authenticated caller of one request."""

    client_id: str
    name: str
    tenant: str
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        return ADMIN in self.scopes or scope in self.scopes

    @property
    def actor(self) -> str:
        """How the audit trail names this caller."""
        return f"client {self.name}"


@dataclass(frozen=True)
class IssuedToken:
    client: ApiClient
    token: str  # shown once: only its digest is stored


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _new_secret(client: ApiClient) -> str:
    secret = secrets.token_urlsafe(32)
    client.secret_sha256 = _digest(secret)
    return f"{TOKEN_PREFIX}.{client.id}.{secret}"


def _checked_scopes(scopes: Iterable[str]) -> list[str]:
    chosen = sorted(set(scopes))
    unknown = [scope for scope in chosen if scope not in SCOPES]
    if unknown:
        raise ClientError(f"unknown scopes {unknown}; the scopes are {sorted(SCOPES)}")
    if not chosen:
        raise ClientError("give at least one scope")
    return chosen


def create_client(session: Session, name: str, tenant: str, scopes: Iterable[str]) -> IssuedToken:
    """Add a client; returns it with its token. Never commits."""
    for label, value in (("name", name), ("tenant", tenant)):
        if not NAME_PATTERN.match(value):
            raise ClientError(f"{label} {value!r} must match {NAME_PATTERN.pattern}")
    if repository.get_by_name(session, name) is not None:
        raise ClientError(f"a client named {name!r} exists")
    client = ApiClient(id=new_id(), name=name, tenant=tenant, scopes=_checked_scopes(scopes))
    token = _new_secret(client)
    repository.add(session, client)
    return IssuedToken(client, token)


def _live(session: Session, name: str) -> ApiClient:
    client = repository.get_by_name(session, name)
    if client is None or client.revoked_at is not None:
        raise ClientError(f"no live client named {name!r}")
    return client


def rotate(session: Session, name: str) -> IssuedToken:
    """A new secret for the client; the old token stops working at commit. Never commits."""
    client = _live(session, name)
    token = _new_secret(client)
    client.rotated_at = utcnow()
    return IssuedToken(client, token)


def revoke(session: Session, name: str) -> ApiClient:
    """The client's token stops working at commit; its row stays, for the audit trail's actors."""
    client = _live(session, name)
    client.revoked_at = utcnow()
    return client


def list_clients(session: Session) -> Sequence[ApiClient]:
    return repository.list_all(session)


def authenticate(session: Session, token: str) -> Principal | None:
    """The live client a token belongs to, or None (malformed, unknown, revoked, wrong secret)."""
    prefix, _, rest = token.partition(".")
    client_id, _, secret = rest.partition(".")
    if prefix != TOKEN_PREFIX or not client_id or not secret or len(client_id) > 36:
        return None
    client = repository.credentials(session, client_id)
    expected = client.secret_sha256 if client is not None else _ABSENT_DIGEST
    matches = hmac.compare_digest(expected, _digest(secret))
    if client is None or not matches or client.revoked_at is not None:
        return None
    return Principal(client.id, client.name, client.tenant, frozenset(client.scopes))
