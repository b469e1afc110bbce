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


class AuditOutcome(BaseModel):
    """What the per-sample membership audit of the request's job found (the job's metrics hold it all)."""

    verdict: str = Field(
        description="forgotten | no_measurable_signal | insufficient_power | residual_membership | "
        "over_forgetting: the strongest claim the evidence supports, never more"
    )
    passed: bool = Field(description="the gate let the new version go live")
    failures: list[str] = Field(description="the rules that failed, in words")
    subjects: dict[str, Any] = Field(description="per data subject: the worst of its samples")

    @classmethod
    def from_metrics(cls, metrics: dict[str, Any] | None) -> AuditOutcome | None:
        audit = (metrics or {}).get("audit")
        if not audit:
            return None
        return cls(
            verdict=audit["verdict"],
            passed=audit["gate"]["passed"],
            failures=audit["gate"]["failures"],
            subjects=audit["subjects"],
        )


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
    audit: AuditOutcome | None = Field(default=None, description="once the job has been audited")
