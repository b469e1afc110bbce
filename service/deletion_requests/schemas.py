from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from service.core.fields import Identifier, Text


class DeletionRequestCreate(BaseModel):
    """Name the samples to erase either by id or by data subject (exactly one of the two)."""

    model_config = ConfigDict(extra="forbid")

    model: Identifier = Field(description="the model's name")
    sample_ids: list[Identifier] | None = Field(
        default=None, description="external sample ids of the model's dataset"
    )
    subject_id: Identifier | None = Field(
        default=None, description="expands to every train sample of this subject"
    )
    reason: Text | None = Field(default=None, max_length=2000)
    method: Identifier | None = Field(
        default=None, description="default: mixunlearn, or mixunlearn-agnostic for a dataset without labels"
    )
    config: dict[str, Any] | None = Field(default=None, description="overrides of the method's defaults")


class DeletionRequestOut(BaseModel):
    id: str
    model: str
    model_id: str
    state: str
    subject_id: str | None
    reason: str | None
    method: str
    config: dict[str, Any]
    sample_count: int = Field(description="samples the request names")
    already_forgotten_count: int = Field(description="of those, samples an earlier request already erased")
    received_at: datetime
    due_at: datetime = Field(description="GDPR deadline: received_at + one month (gdpr_due_days)")
    completed_at: datetime | None
    job_id: str | None = Field(description="None when every sample was already forgotten")
