"""Stage 3, unlearn: the method run on the base version, its checkpoint stored (content-addressed, so a retry
rewrites the same object) and the job moved to ``evaluating``; a job claimed again in ``evaluating`` resumes
from that checkpoint instead."""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

from torch import nn

from service.jobs import service as jobs_service
from service.storage import StoredObject
from worker.audit import AuditRules
from worker.checkpoints import state_dict_to_bytes
from worker.engine.api import unlearn
from worker.engine.spec import ModelSpec
from worker.pipeline.data import JobSets, load_checkpoint
from worker.pipeline.heartbeat import Heartbeat

if TYPE_CHECKING:
    from worker.pipeline.job import JobRun


def unlearn_or_resume(
    job: JobRun,
    heartbeat: Heartbeat,
    spec: ModelSpec,
    base: nn.Module,
    sets: JobSets,
    config: Any,
    rules: AuditRules,
) -> tuple[nn.Module, StoredObject, float | None]:
    """The unlearned model, its stored checkpoint and the seconds unlearning took."""
    claimed = job.claimed
    if claimed.state == "evaluating":  # an earlier attempt got this far: resume from its checkpoint
        stored = StoredObject(**claimed.resume["checkpoint"])
        model = load_checkpoint(job.store, stored.uri, stored.sha256, spec)
        return model, stored, claimed.resume.get("unlearn_seconds")
    job.step = "unlearn"
    heartbeat.phase = "unlearning"
    started = time.monotonic()
    model = unlearn(
        base, spec, sets.forget, sets.remaining, config,
        progress=heartbeat.report, cancel=heartbeat.token, runtime=job.runtime,
    )  # fmt: skip
    unlearn_seconds = round(time.monotonic() - started, 3)
    stored = job.store.put(state_dict_to_bytes(model))
    with job.session_factory.begin() as session:
        jobs_service.set_state(
            session, claimed.job_id, "evaluating", worker_id=job.worker_id,
            metrics={"rule": rules.to_dict(), "checkpoint": dataclasses.asdict(stored),
                     "unlearn_seconds": unlearn_seconds},
        )  # fmt: skip
    return model, stored, unlearn_seconds
