"""Hand-off of committed jobs to workers.

The job row is committed before :meth:`JobDispatcher.dispatch` is called, so Postgres, not the queue, is the
source of truth: a failed or lost dispatch leaves a queued job that ``jobs.service.list_stale_queued`` finds
and a sweeper re-dispatches; a duplicate delivery is harmless (``jobs.service.claim_job`` runs a job once).
A message is a ticket to run one job: the worker that gets it takes the most urgent ready job (earliest due
date, of a model no other job is running on), which need not be the one named.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from typing import Protocol

from sqlalchemy.orm import Session, sessionmaker

from service.core.logs import current_context
from service.core.settings import Settings

log = logging.getLogger(__name__)


class JobDispatcher(Protocol):
    def dispatch(self, job_id: str, delay_s: float = 0.0) -> None:
        """Send the job to a worker, to run no sooner than ``delay_s`` from now. May raise; the caller logs
        and leaves the job queued."""
        ...


GPU_QUEUE = "gpu"
RUN_JOB_TASK = "lethe.run_job"
REQUEST_ID_MESSAGE_HEADER = "lethe_request_id"  # the HTTP request id that queued the job


class CeleryDispatcher:
    """Sends ``lethe.run_job`` by name to the ``gpu`` queue, importing nothing of the worker (no torch here).

    The task id is the job id, so the sweeper can tell which jobs still have a message in Redis.
    """

    def __init__(self, redis_url: str) -> None:
        from celery import Celery  # only processes that dispatch to Celery pay for its import

        self._app = Celery("lethe-dispatch", broker=redis_url)

    def dispatch(self, job_id: str, delay_s: float = 0.0) -> None:
        # The HTTP request that queued the job travels with its message, into the worker's log lines.
        request_id = current_context().get("request_id")
        self._app.send_task(
            RUN_JOB_TASK, args=[job_id], queue=GPU_QUEUE, task_id=job_id, countdown=delay_s or None,
            headers={REQUEST_ID_MESSAGE_HEADER: request_id} if request_id else None,
        )  # fmt: skip


class InProcessDispatcher:
    """Runs jobs one after another on a background thread of this process, through the same
    ``worker.pipeline.run_job`` as the Celery task (the demo; no Redis, no worker process).

    The thread, and with it the worker's imports (torch), starts with the first dispatch: an API that never
    queues a job never pays for them."""

    def __init__(self, session_factory: sessionmaker[Session], settings: Settings) -> None:
        self._session_factory = session_factory
        self._settings = settings
        self._jobs: queue.Queue[str] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="lethe-inprocess-worker", daemon=True)
        self._start = threading.Lock()

    def dispatch(self, job_id: str, delay_s: float = 0.0) -> None:
        with self._start:
            if self._thread.ident is None:  # not started yet
                self._thread.start()
        if delay_s <= 0:
            self._jobs.put(job_id)
            return
        timer = threading.Timer(delay_s, self._jobs.put, args=[job_id])
        timer.daemon = True
        timer.start()

    def join(self) -> None:
        """Wait until every dispatched job has been run."""
        self._jobs.join()

    def _work(self) -> None:
        from service.storage import worker_store
        from worker.pipeline import NothingReady, run_job  # torch loads here, on this thread

        settings = self._settings
        store = worker_store(settings.storage_url, settings.cache_dir, settings.cache_max_bytes)
        while True:
            job_id = self._jobs.get()
            try:
                run_job(
                    job_id, session_factory=self._session_factory, store=store, settings=self._settings,
                    worker_id=f"inprocess:{os.getpid()}", dispatcher=self,
                )  # fmt: skip
            except NothingReady as wait:
                self.dispatch(job_id, delay_s=wait.retry_in)
            except Exception:
                log.exception("job %s: the in-process worker failed", job_id)
            finally:
                self._jobs.task_done()


def build_dispatcher(settings: Settings, session_factory: sessionmaker[Session]) -> JobDispatcher:
    if settings.dispatcher == "inprocess":
        return InProcessDispatcher(session_factory, settings)
    return CeleryDispatcher(settings.redis_url)
