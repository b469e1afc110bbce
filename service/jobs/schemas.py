from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from service.jobs.tables import TERMINAL_STATES, Job


class Progress(BaseModel):
    model_config = ConfigDict(extra="allow")

    step: int | None = None
    total_steps: int | None = None
    epoch: int | None = None
    total_epochs: int | None = None
    losses: dict[str, float] = {}


class Timings(BaseModel):
    created_at: datetime
    started_at: datetime | None
    evaluation_started_at: datetime | None
    finished_at: datetime | None
    queued_seconds: float | None = Field(description="created -> started")
    running_seconds: float | None = Field(description="started -> finished (so far, while running)")


class JobError(BaseModel):
    reason: str = Field(description="machine-readable slug, e.g. canceled, audit_gate, worker_error")
    detail: str | None


class JobOut(BaseModel):
    id: str
    kind: str = Field(description="unlearn (a deletion request's job) or build_references (the audit's)")
    request_ids: list[str] = Field(
        description="the deletion requests whose erasure from the model this job runs (coalesced; earliest "
        "due first); none for a reference build"
    )
    model_id: str
    state: str
    done: bool = Field(description="the state is terminal (AIP-151)")
    method: str
    config: dict[str, Any]
    progress: Progress | None
    timings: Timings
    metrics: dict[str, Any] | None
    base_version_id: str | None
    result_version_id: str | None
    error: JobError | None
    cancel_requested: bool
    sample_count: int = Field(description="samples the job's requests name (shared ones counted per request)")
    batch_open: bool = Field(description="still queued and taking more requests of its model")
    ready_at: datetime | None = Field(description="when a worker may take it (the coalescing wait's end)")
    due_at: datetime | None = Field(
        description="the earliest due date among its requests: workers take the earliest first"
    )

    @classmethod
    def from_job(cls, job: Job, now: datetime, request_ids: list[str]) -> JobOut:
        def seconds(start: datetime | None, end: datetime | None) -> float | None:
            return (end - start).total_seconds() if start is not None and end is not None else None

        return cls(
            id=job.id,
            kind=job.kind,
            request_ids=request_ids,
            model_id=job.model_id,
            state=job.state,
            done=job.state in TERMINAL_STATES,
            method=job.method,
            config=job.config,
            progress=Progress.model_validate(job.progress) if job.progress is not None else None,
            timings=Timings(
                created_at=job.created_at,
                started_at=job.started_at,
                evaluation_started_at=job.evaluation_started_at,
                finished_at=job.finished_at,
                queued_seconds=seconds(job.created_at, job.started_at),
                running_seconds=seconds(job.started_at, job.finished_at or now),
            ),
            metrics=job.metrics,
            base_version_id=job.base_version_id,
            result_version_id=job.result_version_id,
            error=JobError(reason=job.error_reason, detail=job.error_detail) if job.error_reason else None,
            cancel_requested=job.cancel_requested,
            sample_count=job.sample_count,
            batch_open=job.batch_open,
            ready_at=job.ready_at,
            due_at=job.due_at,
        )


class JobPage(BaseModel):
    items: list[JobOut]
    next_cursor: str | None
