from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from service.core.database import Base, JSONType

GENESIS = "0" * 64  # the "previous hash" of the first event


class TrailEvent(Base):
    """One event. ``hash`` = SHA-256(prev_hash || RFC 8785 JSON of the other fields); never updated."""

    __tablename__ = "trail_events"

    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    occurred_at: Mapped[datetime]
    actor: Mapped[str] = mapped_column(String(200))  # "api", a worker's id, "cli"
    kind: Mapped[str] = mapped_column(String(64))  # e.g. request.created, job.succeeded, report.downloaded
    request_id: Mapped[str | None] = mapped_column(String(36), index=True)  # the deletion request it concerns
    subject_type: Mapped[str] = mapped_column(String(32))  # request | job | version | samples | report
    subject_id: Mapped[str] = mapped_column(String(64))
    data: Mapped[dict[str, Any]] = mapped_column(JSONType)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64), unique=True)


class TrailHead(Base):
    """The chain's last event, one row: appending locks it, so concurrent appends (API, workers) line up."""

    __tablename__ = "trail_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"))
    hash: Mapped[str] = mapped_column(String(64))
