from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from service.core.clock import utcnow
from service.core.database import Base


class ErasureReport(Base):
    """An issued report: its canonical JSON exactly as signed, and the detached signature. Never updated."""

    __tablename__ = "erasure_reports"

    request_id: Mapped[str] = mapped_column(ForeignKey("deletion_requests.id"), primary_key=True)
    content: Mapped[str] = mapped_column(Text)  # RFC 8785 canonical JSON, UTF-8: the signed bytes
    sha256: Mapped[str] = mapped_column(String(64))
    key_id: Mapped[str] = mapped_column(String(16))
    signature: Mapped[str] = mapped_column(Text)  # base64 Ed25519 signature of ``content``
    # The sample commitment's salt (hex): secret, so the report's root cannot be tested against guessed ids.
    commitment_salt: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
