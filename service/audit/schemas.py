from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt


class ReferenceBuildCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    references: StrictInt | None = Field(
        default=None, description="reference models K (even, 2-64); default LETHE_AUDIT_REFERENCES"
    )


class ReferenceSetOut(BaseModel):
    id: str
    model: str
    references: int
    checkpoint_sha256: str
    size: int
    summary: dict[str, Any] = Field(description="recipe, seed, sample counts, build seconds")
    job_id: str | None
    created_at: datetime
