from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, JsonValue
from pydantic.json_schema import SkipJsonSchema

from service.core.fields import Identifier, Text, exactly_one_of
from worker.engine.config import METHODS

_METHOD_NAMES: list[JsonValue] = [*sorted(METHODS)]


# The document states these members' exclusive pairs; a JSON null counts as absent (the schema lists only
# the present form of each: SkipJsonSchema).
class DeletionRequestCreate(BaseModel):
    """Erase samples from one model, or from every model trained on a dataset (exactly one of ``model`` and
    ``dataset_id``); name the samples by id or by data subject (exactly one of the two)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra=exactly_one_of(("model", "dataset_id"), ("sample_ids", "subject_id")),
    )

    model: Identifier | SkipJsonSchema[None] = Field(
        default=None, description="the model's name: erase from this model only"
    )
    dataset_id: Identifier | SkipJsonSchema[None] = Field(
        default=None,
        description="erase from every model registered on this dataset, and from any registered on it later",
    )
    sample_ids: Annotated[list[Identifier], Field(min_length=1)] | SkipJsonSchema[None] = Field(
        default=None,
        json_schema_extra={"uniqueItems": True},
        description="external sample ids of the dataset, each once (at most LETHE_MAX_SAMPLES_PER_REQUEST)",
    )
    subject_id: Identifier | SkipJsonSchema[None] = Field(
        default=None, description="expands to every train sample of this subject"
    )
    reason: Text | None = Field(default=None, max_length=2000)
    method: Identifier | SkipJsonSchema[None] = Field(
        default=None,
        json_schema_extra={"enum": _METHOD_NAMES},
        description="default: mixunlearn, or mixunlearn-agnostic for a dataset without labels",
    )
    config: dict[str, Any] | None = Field(default=None, description="overrides of the method's defaults")
    due_at: datetime | None = Field(
        default=None,
        description="the legal deadline when earlier than the default (received + gdpr_due_days), e.g. for a "
        "request the data subject made before it reached Lethe; jobs are run earliest due date first",
    )


class AuditOutcome(BaseModel):
    """What the per-sample membership audit of a request's samples found in one model (the job's metrics hold
    it all)."""

    verdict: str = Field(
        description="forgotten | no_measurable_signal | insufficient_power | residual_membership | "
        "over_forgetting | unverifiable | unchanged | insufficient_controls: the strongest claim the "
        "evidence supports, never more"
    )
    evidence: dict[str, Any] | None = Field(
        default=None,
        description="which samples the verdict rests on: `scope` request (its own) or batch (its job's "
        "samples pooled, where its own are too few to speak), their number, and the smallest member-like "
        "share the test would have flagged among them",
    )
    power: dict[str, Any] | None = Field(
        default=None,
        description="the power check on the new version: the share of samples it still holds (matched in "
        "difficulty) and of never-seen samples that the same test flags",
    )
    passed: bool = Field(description="the gate accepted the erasure of this request's samples")
    failures: list[str] = Field(description="the rules that failed, in words")
    subjects: dict[str, Any] = Field(description="per data subject: the worst of its samples")

    @classmethod
    def from_metrics(cls, metrics: dict[str, Any] | None, request_id: str) -> AuditOutcome | None:
        audit = ((metrics or {}).get("audits") or {}).get(request_id)
        if not audit:
            return None
        return cls(
            verdict=audit["verdict"],
            passed=audit["gate"]["passed"],
            failures=audit["gate"]["failures"],
            subjects=audit["subjects"],
            evidence=audit.get("evidence"),
            power=audit.get("power"),
        )


class ErasureOut(BaseModel):
    """The request's erasure from one model."""

    model: str
    model_id: str
    state: str = Field(description="pending (queued or in a job) | completed | rejected | failed | canceled")
    job_id: str | None = Field(description="the job that holds it now, or the last one that did")
    pending_count: int = Field(description="samples the model still held when the request arrived")
    already_erased_count: int = Field(
        description="samples the model had already erased (an earlier request) or was never trained on"
    )
    verdict: str | None = Field(description="the last audit's verdict, or already_erased")
    result_version: int | None = Field(description="the version that erased the samples")
    attempts: list[dict[str, Any]] = Field(
        description="each job that held it: a request that failed its audit in a batch is retried alone"
    )
    settled_at: datetime | None
    audit: AuditOutcome | None = Field(default=None, description="the last job's audit of these samples")
    purge: dict[str, Any] | None = Field(
        default=None,
        description="once completed: the purge of every copy that still held the samples (state scheduled | "
        "running | done, not_before, purged_at, and what was deleted: checkpoints with their SHA-256, "
        "objects, dataset rows); the request is completed only when it is done",
    )


class DeletionRequestOut(BaseModel):
    id: str
    scope: str = Field(description="model (one model) or dataset (every model of the dataset)")
    model: str | None = Field(description="the model a model-scoped request names")
    model_id: str | None
    dataset_id: str
    origin_request_id: str | None = Field(
        description="set when Lethe queued this request itself: the dataset-wide request it carries to a "
        "model registered later"
    )
    state: str = Field(description="processing until every model settled; completed only if each completed")
    subject_id: str | None
    reason: str | None
    method: str
    config: dict[str, Any]
    sample_count: int = Field(description="samples the request names")
    received_at: datetime
    due_at: datetime = Field(description="GDPR deadline: received_at + one month (gdpr_due_days) or earlier")
    completed_at: datetime | None
    erasures: list[ErasureOut] = Field(description="per model the request applies to")


# The largest bulk call: a backlog goes in several, each answered within a request's time.
MAX_BULK_ITEMS = 1000


class BulkItem(DeletionRequestCreate):
    """One deletion request of a bulk call, with its own ``idempotency_key`` (the client's, shared with
    single POSTs: an item retried alone, or a single POST retried in bulk, replays its first answer)."""

    idempotency_key: str | SkipJsonSchema[None] = Field(default=None, min_length=1, max_length=255)


class BulkCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[BulkItem] = Field(min_length=1, max_length=MAX_BULK_ITEMS)


class BulkItemOut(BaseModel):
    """One item's outcome: its request (202 queued, 200 settled at once), or the problem that refused it
    (``problem``, as a single POST would have answered it). Nothing of a refused item was written."""

    index: int = Field(description="the item's place in the call")
    status: int
    replayed: bool = Field(description="the item's idempotency key had an answer already: this is it")
    request: DeletionRequestOut | None = None
    problem: dict[str, Any] | None = None


class BulkOut(BaseModel):
    accepted: int = Field(description="items answered 200 or 202 (replays included)")
    refused: int
    items: list[BulkItemOut]
