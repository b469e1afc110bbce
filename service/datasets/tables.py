from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from service.core.clock import utcnow
from service.core.database import Base, JSONType, new_id, one_of

SPLITS = ("train", "audit")


class Dataset(Base):
    """A training dataset: one ``.npz`` array, an object of the store, plus the registry of its samples. It
    belongs to a tenant, as do the models trained on it and the requests filed against it."""

    __tablename__ = "datasets"
    __table_args__ = (UniqueConstraint("tenant", "name"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant: Mapped[str] = mapped_column(String(100))
    name: Mapped[str] = mapped_column(String(200))
    # The array's object URI in the store (content-addressed: its SHA-256 is in the key). A dataset registered
    # before the store held arrays has a server path here, which only a worker sharing that disk can read.
    array_uri: Mapped[str] = mapped_column(Text)
    # The input the array was adopted from (a data-directory path or an ``inputs/`` key): deleted by the
    # first purge of the dataset's rows, since it holds them too.
    array_source: Mapped[str | None] = mapped_column(Text)
    num_rows: Mapped[int] = mapped_column(Integer)  # rows in the array file, not registered samples
    sample_shape: Mapped[list[int]] = mapped_column(JSONType)  # (C, H, W) from the array's header
    num_classes: Mapped[int | None] = mapped_column(Integer)  # None: the dataset carries no labels
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    @property
    def labelled(self) -> bool:
        return self.num_classes is not None


class Sample(Base):
    """A registered sample. Never deleted: each model's erasure of it is an ``erased_samples`` row, and later
    jobs of that model leave it out. Once erased, its subject is kept only as a keyed hash, and once every
    model erased it, its row in the array is zeroed and its label dropped."""

    __tablename__ = "samples"
    __table_args__ = (
        UniqueConstraint("dataset_id", "sample_id"),
        UniqueConstraint("dataset_id", "row"),
        one_of("split", SPLITS),
        Index("ix_samples_dataset_id_subject_id", "dataset_id", "subject_id"),
        Index("ix_samples_dataset_id_subject_hash", "dataset_id", "subject_hash"),
    )

    # Integer surrogate key: samples are many and referenced from request rows.
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"))
    sample_id: Mapped[str] = mapped_column(String(200))
    row: Mapped[int] = mapped_column(Integer)
    label: Mapped[int | None] = mapped_column(Integer)
    split: Mapped[str] = mapped_column(String(8))
    subject_id: Mapped[str | None] = mapped_column(String(200))  # None once the sample is erased:
    subject_hash: Mapped[str | None] = mapped_column(String(64))  # then only its keyed hash (service.purges)
    purged_at: Mapped[datetime | None]  # when its row left the dataset array (every model had erased it)
