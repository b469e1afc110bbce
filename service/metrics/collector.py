"""The service's state as Prometheus series, read from Postgres at each scrape: the same answer from every API
replica, and nothing to lose when one restarts. Aggregates only: no tenant, subject or sample appears."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime
from itertools import pairwise
from typing import Any, TypeVar

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session, sessionmaker

from service.core.clock import utcnow
from service.datasets.tables import Dataset
from service.deletion_requests.tables import REQUEST_STATES, DeletionRequest
from service.erasures.tables import ErasureTarget
from service.jobs.tables import JOB_STATES, Job

# Open requests by days left until their due date: the buckets a data-protection officer reads (overdue, due
# within a day, within 3, within a week, ...).
DAYS_LEFT_BOUNDS = (0, 1, 3, 7, 14, 30)
DAYS_LEFT_BUCKETS = (
    "overdue",
    *(f"{low}-{high}" for low, high in pairwise(DAYS_LEFT_BOUNDS)),
    f">{DAYS_LEFT_BOUNDS[-1]}",
)


def days_left_bucket(due_at: datetime, now: datetime) -> str:
    days = (due_at - now).total_seconds() / 86_400
    if days < 0:
        return DAYS_LEFT_BUCKETS[0]
    for bucket, high in zip(DAYS_LEFT_BUCKETS[1:], DAYS_LEFT_BOUNDS[1:], strict=False):
        if days < high:
            return bucket
    return DAYS_LEFT_BUCKETS[-1]


_Statement = TypeVar("_Statement", bound=Select)  # any row shape


# The state queries, shared with the console (service.console), which reads them for one tenant: its counts
# are the series' counts, restricted to what the tenant owns (a request and its erasures through its dataset).
def _of_tenant(statement: _Statement, tenant: str | None) -> _Statement:
    if tenant is None:
        return statement
    return statement.join(Dataset, Dataset.id == DeletionRequest.dataset_id).where(Dataset.tenant == tenant)


def requests_by_state(session: Session, tenant: str | None = None) -> dict[str, int]:
    statement = select(DeletionRequest.state, func.count()).group_by(DeletionRequest.state)
    return {state: int(count) for state, count in session.execute(_of_tenant(statement, tenant)).all()}


def verdict_counts(session: Session, tenant: str | None = None) -> dict[str, int]:
    """Erasures (request x model) by their audit's verdict."""
    statement = (
        select(ErasureTarget.verdict, func.count())
        .join(DeletionRequest, DeletionRequest.id == ErasureTarget.request_id)
        .where(ErasureTarget.verdict.is_not(None))
        .group_by(ErasureTarget.verdict)
    )
    return {
        str(verdict): int(count) for verdict, count in session.execute(_of_tenant(statement, tenant)).all()
    }


def open_requests_by_days_left(session: Session, now: datetime, tenant: str | None = None) -> dict[str, int]:
    statement = select(DeletionRequest.due_at).where(DeletionRequest.state == "processing")
    buckets = dict.fromkeys(DAYS_LEFT_BUCKETS, 0)
    for due_at in session.scalars(_of_tenant(statement, tenant)).all():
        buckets[days_left_bucket(due_at, now)] += 1
    return buckets


class StateCollector(Collector):
    def __init__(self, session_factory: sessionmaker[Session], now: Callable[[], datetime] = utcnow) -> None:
        self._session_factory = session_factory
        self._now = now

    def collect(self) -> Iterator[Any]:
        now = self._now()
        with self._session_factory() as session:
            requests = requests_by_state(session)
            jobs = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
            oldest = session.scalar(select(func.min(Job.created_at)).where(Job.state == "queued"))
            verdicts = verdict_counts(session)
            buckets = open_requests_by_days_left(session, now)
        by_state = GaugeMetricFamily(
            "lethe_deletion_requests", "deletion requests by state", labels=["state"]
        )
        for state in REQUEST_STATES:
            by_state.add_metric([state], requests.get(state, 0))
        yield by_state
        job_states = GaugeMetricFamily("lethe_jobs", "jobs by state", labels=["state"])
        for state in JOB_STATES:
            job_states.add_metric([state], jobs.get(state, 0))
        yield job_states
        yield GaugeMetricFamily(
            "lethe_queue_depth", "jobs queued, not yet claimed", value=jobs.get("queued", 0)
        )
        age = (now - oldest).total_seconds() if oldest is not None else 0.0
        yield GaugeMetricFamily(
            "lethe_queue_oldest_age_seconds", "age of the oldest queued job (0: none queued)", value=age
        )
        verdict_family = GaugeMetricFamily(
            "lethe_audit_verdicts", "erasures (request x model) by their audit's verdict", labels=["verdict"]
        )
        for verdict, count in verdicts.items():
            verdict_family.add_metric([verdict], count)
        yield verdict_family
        due = GaugeMetricFamily(
            "lethe_open_requests_by_days_left",
            "deletion requests still processing, by days left until their GDPR due date",
            labels=["days_left"],
        )
        for bucket in DAYS_LEFT_BUCKETS:
            due.add_metric([bucket], buckets.get(bucket, 0))
        yield due
