"""Queries on API clients."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import Row, bindparam, select
from sqlalchemy.orm import Session

from service.clients.tables import ApiClient


def add(session: Session, client: ApiClient) -> None:
    session.add(client)
    session.flush()


def get(session: Session, client_id: str) -> ApiClient | None:
    return session.get(ApiClient, client_id)


# Every authenticated request's query: built once (the statement and its cache key), read as plain columns.
_CREDENTIALS = select(
    ApiClient.id, ApiClient.name, ApiClient.tenant, ApiClient.scopes, ApiClient.secret_sha256,
    ApiClient.revoked_at,
).where(ApiClient.id == bindparam("client_id"))  # fmt: skip
Credentials = Row[str, str, str, list[str], str, datetime | None]


def credentials(session: Session, client_id: str) -> Credentials | None:
    """What authenticating a token needs of its client: id, name, tenant, scopes, digest, revocation."""
    # On the session's connection: plain columns need none of the ORM's execution.
    return session.connection().execute(_CREDENTIALS, {"client_id": client_id}).one_or_none()


def get_by_name(session: Session, name: str) -> ApiClient | None:
    return session.scalar(select(ApiClient).where(ApiClient.name == name))


def list_all(session: Session) -> Sequence[ApiClient]:
    return session.scalars(select(ApiClient).order_by(ApiClient.tenant, ApiClient.name)).all()
