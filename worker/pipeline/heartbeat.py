"""A running job's heartbeat: progress written and the lease renewed from a background thread."""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import SQLAlchemyError

from service.jobs import service as jobs_service
from worker.engine.progress import CancellationToken, ProgressEvent

if TYPE_CHECKING:
    from worker.pipeline.job import JobRun

log = logging.getLogger(__name__)


class Heartbeat:
    """Once per interval, from a background thread: write the latest progress and renew the lease in one
    short transaction, and set the cancellation token when the job should stop (cancel requested, or no longer
    ours). The engine's progress callback only stores the event: no database round trip in the training loop.
    """

    def __init__(self, job: JobRun) -> None:
        self._job = job
        self.token = CancellationToken()
        self.phase = "starting"  # audit_references | unlearning | auditing | purging
        self.latest: dict[str, Any] = {
            "phase": self.phase,
            "step": 0,
            "total_steps": 0,
            "epoch": 0,
            "total_epochs": 0,
            "losses": {},
        }
        self._stopped = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name=f"heartbeat-{job.claimed.job_id}", daemon=True
        )

    def report(self, event: ProgressEvent) -> None:
        self.latest = {"phase": self.phase, **dataclasses.asdict(event)}

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stopped.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stopped.wait(self._job.settings.progress_interval_s):
            self.beat()

    def beat(self) -> None:
        job = self._job
        try:
            with job.session_factory.begin() as session:
                stop = jobs_service.record_progress(
                    session, job.claimed.job_id, self.latest, job.worker_id, job.lease
                )
        except SQLAlchemyError:
            # A blip: the lease outlives several missed beats. A lasting outage lets it lapse, as it should.
            log.warning("job %s: heartbeat failed", job.claimed.job_id, exc_info=True)
            return
        if stop:
            self.token.cancel()
