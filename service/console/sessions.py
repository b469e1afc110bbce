"""Console sign-in: a signed, HttpOnly session cookie naming an API client, and CSRF tokens bound to it.

The cookie carries ``<client id>.<expiry>.<nonce>.<mac>``, never the token. The MAC key is derived from a
server secret and the client's stored token digest, so rotating or revoking the client ends its console
sessions at once, and someone who can read the database cannot mint one. Stateless on purpose: every API
replica accepts the cookie without a session table. The server secret is derived from the first
report-signing key (every API replica holds the key directory, and a rotation adds keys but keeps that one;
a labelled hash keeps the two uses apart), or is random per process when the API has none (sessions then end
when it restarts).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from sqlalchemy.orm import Session

from service.clients import repository as clients_repository
from service.clients.service import Principal
from service.clients.tables import ApiClient
from service.reports.keys import KeyRing

logger = logging.getLogger(__name__)

SESSION_COOKIE = "lethe_console"
SIGN_IN_COOKIE = "lethe_console_sign_in"  # the sign-in form's own CSRF token (double submit)
SESSION_SECONDS = 8 * 3600  # a working day; one cookie cannot be revoked alone (rotating its client can)
_LABEL = b"lethe console session key v1\x00"


def server_secret(key_dir: Path) -> bytes:
    """The secret console sessions are keyed with (see the module docstring)."""
    keys = KeyRing(key_dir).signing_keys()
    if not keys:
        logger.warning("no report-signing key: console sessions end when this process restarts")
        return secrets.token_bytes(32)
    raw = keys[0].private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return hashlib.sha256(_LABEL + raw).digest()


@dataclass(frozen=True)
class ConsoleSession:
    principal: Principal
    csrf_token: str
    expires: int


def _client_key(secret: bytes, client: ApiClient) -> bytes:
    return hmac.new(secret, client.secret_sha256.encode(), hashlib.sha256).digest()


def _mac(key: bytes, message: str) -> str:
    return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()


def _principal(client: ApiClient) -> Principal:
    return Principal(client.id, client.name, client.tenant, frozenset(client.scopes))


def issue(secret: bytes, session: Session, principal: Principal, now: float | None = None) -> str:
    """The cookie value of a new session of an authenticated client."""
    client = clients_repository.get(session, principal.client_id)
    assert client is not None  # just authenticated
    expires = int(now if now is not None else time.time()) + SESSION_SECONDS
    body = f"{client.id}.{expires}.{secrets.token_urlsafe(16)}"
    return f"{body}.{_mac(_client_key(secret, client), body)}"


def read(
    secret: bytes, session: Session, cookie: str | None, now: float | None = None
) -> ConsoleSession | None:
    """The live session a cookie names, or None (absent, malformed, forged, expired, client rotated or
    revoked)."""
    parts = (cookie or "").split(".")
    if len(parts) != 4 or not parts[1].isdigit() or len(parts[0]) > 36:
        return None
    client_id, expires, nonce, mac = parts
    client = clients_repository.get(session, client_id)
    if client is None or client.revoked_at is not None:
        return None
    key = _client_key(secret, client)
    if not hmac.compare_digest(mac, _mac(key, f"{client_id}.{expires}.{nonce}")):
        return None
    if int(expires) <= (now if now is not None else time.time()):
        return None
    return ConsoleSession(_principal(client), _mac(key, f"csrf.{nonce}"), int(expires))


def new_form_token() -> str:
    return secrets.token_urlsafe(24)


def csrf_matches(expected: str, given: str | None) -> bool:
    return given is not None and hmac.compare_digest(expected.encode(), given.encode())
