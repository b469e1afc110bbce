from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from service.core.database import Base


class PurgedObject(Base):
    """An object of the store deleted because it held erased data: its bytes may never come back (a checkpoint
    with this digest is refused at registration) and every worker drops it from its cache."""

    __tablename__ = "purged_objects"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))  # checkpoint | dataset_array | reference_set
    size: Mapped[int] = mapped_column(BigInteger)
    purged_at: Mapped[datetime] = mapped_column(index=True)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"))
    reason: Mapped[str] = mapped_column(Text)
