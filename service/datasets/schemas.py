from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from service.core.fields import Identifier, Text


class SampleIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sample_id: Identifier
    row: int = Field(ge=0, description="index into the array file's x")
    label: int | None = Field(default=None, ge=0)
    split: Literal["train", "audit"] = Field(description="audit samples are held out and never trained on")
    subject_id: Identifier | None = None


class DatasetCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Identifier
    array_path: Text = Field(
        min_length=1,
        description="server-side path to an .npz whose array x is float32 (N, C, H, W), already normalised",
    )
    num_classes: int | None = Field(
        default=None, ge=2, description="required when samples carry labels; omit for a label-free dataset"
    )
    samples: list[SampleIn] = Field(min_length=1)


class SampleCounts(BaseModel):
    train: int
    audit: int
    forgotten: int


class DatasetOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    array_path: str
    num_rows: int
    sample_shape: list[int]
    num_classes: int | None
    labelled: bool
    created_at: datetime
    samples: SampleCounts


class SampleOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    sample_id: str
    row: int
    label: int | None
    split: str
    subject_id: str | None
    forgotten_by_request_id: str | None
    forgotten_at: datetime | None


class SamplePage(BaseModel):
    items: list[SampleOut]
    next_cursor: str | None
