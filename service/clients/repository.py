"""Queries on API clients."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.clients.tables import ApiClient


def add(session: Session, client: ApiClient) -> None:
    session.add(client)
    session.flush()


def get(session: Session, client_id: str) -> ApiClient | None:
    return session.get(ApiClient, client_id)


def get_by_name(session: Session, name: str) -> ApiClient | None:
    return session.scalar(select(ApiClient).where(ApiClient.name == name))


def list_all(session: Session) -> Sequence[ApiClient]:
    return session.scalars(select(ApiClient).order_by(ApiClient.tenant, ApiClient.name)).all()
