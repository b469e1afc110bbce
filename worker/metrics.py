"""A worker's own Prometheus series (job phases, outcomes), served by the worker process on
``LETHE_WORKER_METRICS_PORT`` (0: not served). The service-wide series (queue, requests, verdicts) are the
API's, read from Postgres."""

from __future__ import annotations

import logging
import time

from prometheus_client import Counter, Histogram, start_http_server

# The pipeline's steps as the phases an operator reads.
PHASES = {"load": "load", "references": "audit_references", "unlearn": "unlearn", "evaluate": "audit",
          "register": "register"}  # fmt: skip

JOB_PHASE_SECONDS = Histogram(
    "lethe_job_phase_seconds", "time a job spent in each phase on this worker", ["kind", "method", "phase"],
    buckets=(0.5, 1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600),
)  # fmt: skip
log = logging.getLogger(__name__)
JOBS_ENDED = Counter("lethe_worker_jobs", "jobs this worker ended, by outcome", ["kind", "method", "state"])


class PhaseTimer:
    """Observes how long a job stays in each phase."""

    def __init__(self, kind: str, method: str) -> None:
        self.kind, self.method = kind, method
        self._phase: str | None = None
        self._since = 0.0

    def enter(self, step: str) -> None:
        self.close()
        self._phase, self._since = PHASES.get(step, step), time.monotonic()

    def close(self) -> None:
        if self._phase is not None:
            JOB_PHASE_SECONDS.labels(self.kind, self.method, self._phase).observe(
                time.monotonic() - self._since
            )
            self._phase = None

    def ended(self, state: str) -> None:
        self.close()
        JOBS_ENDED.labels(self.kind, self.method, state).inc()


def serve(port: int) -> None:
    """Serve the series on ``port``; a port in use is logged, not fatal (the worker still takes jobs)."""
    if not port:
        return
    try:
        start_http_server(port)
    except OSError:
        log.exception("worker metrics: port %d unavailable; series not served", port)
