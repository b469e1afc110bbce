"""Stage 2, references: the model lineage's audit reference set, loaded, or trained and registered when
the model has none (its first audited job, or a ``build_references`` job:
``POST /models/{name}/audit-references``)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from torch import nn

from service.audit import service as audit_service
from service.jobs import service as jobs_service
from service.purges import service as purges
from worker.audit import LabelledRows, ReferenceSet, build_reference_set
from worker.audit.population import label_splits
from worker.engine.config import TrainingConfig
from worker.engine.spec import ModelSpec
from worker.pipeline.data import JobSets, concat, load_checkpoint, read_verified, rows_of, spec_of
from worker.pipeline.errors import JobFailed
from worker.pipeline.heartbeat import Heartbeat

if TYPE_CHECKING:
    from worker.pipeline.job import JobRun

log = logging.getLogger(__name__)


def build_job(job: JobRun, heartbeat: Heartbeat) -> str:
    """A ``build_references`` job: this stage alone, on demand."""
    claimed = job.claimed
    spec = spec_of(claimed.spec)
    base = load_checkpoint(job.store, claimed.base_version.storage_uri, claimed.base_version.sha256, spec)
    sets = job.load_sets(seed=0)
    job.step = "references"
    row, _refs = build_references(
        job, heartbeat, spec, base, sets, int(claimed.config["references"]), int(claimed.config["seed"])
    )
    with job.session_factory.begin() as session:
        jobs_service.finish(
            session, claimed.job_id, "succeeded", worker_id=job.worker_id,
            metrics={"reference_set_id": row, "references": _refs.describe()},
        )  # fmt: skip
        # The set it replaces was scored by models trained on data erased since: its purge deletes it.
        purge = (
            purges.queue(session, claimed.model_id)[0]
            if purges.superseded_sets(session, claimed.model_id)
            else None
        )
    if purge is not None:
        job.dispatcher.dispatch(purge.id)
    return "succeeded"


def references(
    job: JobRun, heartbeat: Heartbeat, spec: ModelSpec, base: nn.Module, sets: JobSets, *, steered: bool
) -> ReferenceSet:
    """The model lineage's reference set; built now when it has none (its first audited job), or when a
    ``steered`` method needs steering references the set was built without."""
    if steered and job.settings.audit_steering_references == 0:
        raise JobFailed(
            "invalid_config",
            f"{job.claimed.method} is steered by reference models the audit never reads, and "
            "LETHE_AUDIT_STEERING_REFERENCES is 0: set it (4 by default) or choose another method",
        )
    with job.session_factory() as session:
        row = audit_service.current_set(session, job.claimed.model_id)
        found = None if row is None else (row.storage_uri, row.checkpoint_sha256)
    refs = None
    if found is not None:
        try:
            refs = ReferenceSet.from_bytes(read_verified(job.store, *found))
            refs.train_columns(sets.forget_rows)
        except (KeyError, ValueError) as exc:
            raise JobFailed(
                "audit_references", f"the model's reference set cannot audit this job: {exc}"
            ) from exc
        if not (steered and refs.steering == 0):
            return refs
    why = "has no audit reference set" if refs is None else "has a reference set without steering references"
    log.info("job %s: model %s %s; building it", job.claimed.job_id, job.claimed.model_name, why)
    _row, refs = build_references(
        job, heartbeat, spec, base, sets,
        refs.k if refs is not None else job.settings.audit_references, job.settings.audit_reference_seed,
    )  # fmt: skip
    if found is not None:  # the set it replaces: its purge deletes it
        with job.session_factory.begin() as session:
            purge = purges.queue(session, job.claimed.model_id)[0]
        job.dispatcher.dispatch(purge.id)
    return refs


def build_references(
    job: JobRun, heartbeat: Heartbeat, spec: ModelSpec, base: nn.Module, sets: JobSets, k: int, seed: int
) -> tuple[str, ReferenceSet]:
    """Train and score the references on every train sample still in the model, store and register."""
    heartbeat.phase = "audit_references"
    pool = concat(sets.forget, sets.remaining)
    splits = label_splits(base, pool, sets.remaining_sample, sets.audit, job.runtime)
    recipe = TrainingConfig(**(job.claimed.training_recipe or {}))
    refs = build_reference_set(
        spec,
        LabelledRows(pool.x, splits.forget.require_labels().numpy(), rows_of(pool)),
        LabelledRows(sets.audit.x, splits.audit.require_labels().numpy(), sets.audit_rows),
        recipe, k=k, seed=seed, steering=job.settings.audit_steering_references, runtime=job.runtime,
        progress=heartbeat.report, cancel=heartbeat.token,
    )  # fmt: skip
    stored = job.store.put(refs.to_bytes())
    with job.session_factory.begin() as session:
        row = audit_service.register_set(
            session, model_id=job.claimed.model_id, dataset_id=job.claimed.dataset_id,
            job_id=job.claimed.job_id, stored=stored, summary=refs.describe(),
        )  # fmt: skip
        row_id = row.id
    log.info("job %s: %d reference models (%d steering) built in %.1f s", job.claimed.job_id, refs.k,
             refs.steering, refs.build_seconds)  # fmt: skip
    return row_id, refs
