"""Hand-off of committed jobs to workers.

The job row is committed before :meth:`JobDispatcher.dispatch` is called, so Postgres, not the queue, is the
source of truth: a failed or lost dispatch leaves a queued job that ``jobs.service.list_stale_queued`` finds
and a sweeper re-dispatches; a duplicate delivery is harmless (``jobs.service.claim_job`` runs a job once).
"""

from __future__ import annotations

from typing import Protocol


class JobDispatcher(Protocol):
    def dispatch(self, job_id: str) -> None:
        """Send the job to a worker. May raise; the caller logs and leaves the job queued."""
        ...
