"""Stage 1, claim: take a job for a message (that one, or a more urgent one), run it, hand the model on."""

from __future__ import annotations

import logging
from datetime import timedelta

import torch
from sqlalchemy.orm import Session, sessionmaker

from service.core.logs import log_context
from service.core.settings import Settings
from service.dispatch import JobDispatcher
from service.jobs import service as jobs_service
from service.purges.service import evict_purged
from service.storage import ObjectStore
from worker.engine.runtime import Runtime
from worker.pipeline.errors import NothingReady
from worker.pipeline.job import JobRun

log = logging.getLogger(__name__)

SessionFactory = sessionmaker[Session]


def run_job(
    job_id: str,
    *,
    session_factory: SessionFactory,
    store: ObjectStore,
    settings: Settings,
    runtime: Runtime | None = None,
    worker_id: str,
    dispatcher: JobDispatcher,
) -> str | None:
    """Take a job with the message for ``job_id`` (that one, or a more urgent one: see
    ``jobs.service.claim_job``), run it to a terminal state and return that state; None when there was
    nothing to do. Raises :class:`NothingReady` when the message must be retried later. Jobs the run queues
    (a request retried alone, a purge) go to ``dispatcher`` once committed."""
    with log_context(message_job_id=job_id):
        lease = timedelta(seconds=settings.job_lease_s)
        with session_factory.begin() as session:
            claimed = jobs_service.claim_job(session, job_id, worker_id, lease)
        if claimed is None:
            log.info("message for job %s: nothing to do (finished, or held by another worker)", job_id)
            return None
        if isinstance(claimed, jobs_service.NotReady):
            raise NothingReady(claimed.retry_in)
        evict_purged(store, session_factory)  # no job reads a blob purged since this worker cached it
        if settings.torch_threads > 0:
            torch.set_num_threads(settings.torch_threads)
        runtime = runtime or Runtime.detect()
        try:
            state = _run(JobRun(claimed, session_factory, store, settings, runtime, worker_id, dispatcher))
            if claimed.kind == "unlearn":  # the erasures it completed are purged now, not after a queue
                with session_factory.begin() as session:
                    purge = jobs_service.claim_ready_purge(session, claimed.model_id, worker_id, lease)
                if purge is not None:
                    _run(JobRun(purge, session_factory, store, settings, runtime, worker_id, dispatcher))
            return state
        finally:
            _send_on(session_factory, dispatcher, claimed.model_id)


def _run(job: JobRun) -> str | None:
    # Every line of the job's life names it, its model and the deletion requests it holds.
    claimed = job.claimed
    request_ids = [target.request_id for target in claimed.targets]
    with log_context(job_id=claimed.job_id, model=claimed.model_name, deletion_request_ids=request_ids):
        return job.run()


def _send_on(session_factory: SessionFactory, dispatcher: JobDispatcher, model_id: str) -> None:
    """A message for the model's next queued job: none is retried while the model is busy, so the worker
    that ends a model's job hands the model on (the sweeper covers a worker that dies first)."""
    try:
        with session_factory() as session:
            found = jobs_service.next_queued(session, model_id)
        if found is not None:
            dispatcher.dispatch(found[0], delay_s=found[1])
    except Exception:
        log.warning("could not send on model %s's next job; the sweeper will", model_id, exc_info=True)
