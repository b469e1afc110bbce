from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from service.core.clock import utcnow
from service.core.database import Base


class ErasureReport(Base):
    """A request's report. ``facts`` are generated in the transaction that settles the request (by the
    worker or the API); the API signs on first download, adding the signing key's id: ``content`` is then
    the exact signed bytes. Neither changes afterwards."""

    __tablename__ = "erasure_reports"

    request_id: Mapped[str] = mapped_column(ForeignKey("deletion_requests.id"), primary_key=True)
    facts: Mapped[str] = mapped_column(Text)  # RFC 8785 canonical JSON of the report, at settlement
    content: Mapped[str | None] = mapped_column(Text)  # the signed bytes: facts plus the signing key's id
    sha256: Mapped[str | None] = mapped_column(String(64))  # of ``content``
    key_id: Mapped[str | None] = mapped_column(String(16))
    signature: Mapped[str | None] = mapped_column(Text)  # base64 Ed25519 signature of ``content``
    # The sample commitment's salt (hex): secret, so the report's root cannot be tested against guessed ids.
    # None for reports since the purge work: their salt is derived from the pseudonym key, kept outside the
    # database (service.purges.pseudonyms).
    commitment_salt: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    signed_at: Mapped[datetime | None]
