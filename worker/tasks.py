"""The Celery task that runs one job, and the sweeper that re-dispatches jobs whose message is gone.

Sweeper: started by the ``worker_ready`` signal as a daemon thread of each worker (no beat process to deploy);
a Redis lock (SET NX EX) lets one worker per interval do the sweep. It re-sends, by job id:
- jobs ready for more than ``sweep_min_age_s`` and still queued, with no message in the queue and none
  reserved by a worker (Redis lost it, or the dispatch after the commit failed);
- jobs whose lease lapsed (their worker died) and that have no message waiting in the queue: the claim takes
  them over and they resume from their last committed step.
It also expires idempotency answers and webhook events past their retention, and (every worker, lock or not)
drops purged objects from the worker's cache.
A message sent twice is harmless: the claim runs a job once.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import threading
import time
from datetime import timedelta
from typing import Any

import redis
from celery import Task
from celery.signals import worker_ready
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from service.core.clock import utcnow
from service.core.database import make_engine, make_session_factory
from service.core.logs import log_context
from service.core.settings import Settings
from service.dispatch import (
    GPU_QUEUE,
    REQUEST_ID_MESSAGE_HEADER,
    RUN_JOB_TASK,
    CeleryDispatcher,
    JobDispatcher,
)
from service.idempotency import service as idempotency
from service.jobs import service as jobs_service
from service.purges.service import evict_purged
from service.storage import ObjectStore, worker_store
from service.webhooks import service as webhooks_service
from worker import webhooks
from worker.celery_app import app

log = logging.getLogger(__name__)

SWEEP_LOCK = "lethe:sweeper"
# kombu's Redis transport: a queue is a list per priority step (name, then name + SEP + step); messages a
# worker reserved and has not acknowledged sit in one hash.
_PRIORITY_SEP = "\x06\x16"
_PRIORITY_STEPS = (3, 6, 9)
_UNACKED = "unacked"


@functools.cache
def _job_resources() -> tuple[Settings, sessionmaker[Session], ObjectStore, CeleryDispatcher]:
    """Built once per process that runs jobs (after any fork), on first use."""
    settings = Settings()
    return (
        settings,
        make_session_factory(make_engine(settings.database_url)),
        worker_store(settings.storage_url, settings.cache_dir, settings.cache_max_bytes),
        CeleryDispatcher(settings.redis_url),
    )


@app.task(name=RUN_JOB_TASK, bind=True, max_retries=None)
def run_job(self: Task, job_id: str) -> str | None:
    # Imported here so torch (and CUDA) load in the process that runs the job, never at import time.
    from worker.pipeline import NothingReady
    from worker.pipeline import run_job as run_pipeline

    settings, session_factory, store, dispatcher = _job_resources()
    try:
        with log_context(request_id=self.request.get(REQUEST_ID_MESSAGE_HEADER)):
            return run_pipeline(
                job_id,
                session_factory=session_factory,
                store=store,
                settings=settings,
                worker_id=f"{self.request.hostname or socket.gethostname()}:{os.getpid()}",
                dispatcher=dispatcher,
            )
    except NothingReady as exc:
        raise self.retry(countdown=exc.retry_in, exc=exc) from exc
    except (OperationalError, InterfaceError) as exc:
        # The database is unreachable (restarting, failing over): the message is sent again later rather
        # than acknowledged, so the job does not wait for the sweeper once the database is back.
        raise self.retry(countdown=settings.retry_after_seconds, exc=exc) from exc


def message_job_ids(client: redis.Redis, queue: str) -> tuple[set[str], set[str]]:
    """Task ids (= job ids) of the messages waiting in ``queue`` and of those reserved by some worker."""
    waiting: set[str] = set()
    for key in (queue, *(f"{queue}{_PRIORITY_SEP}{step}" for step in _PRIORITY_STEPS)):
        waiting.update(_task_id(json.loads(raw)) for raw in client.lrange(key, 0, -1))
    reserved = {_task_id(json.loads(raw)[0]) for raw in client.hvals(_UNACKED)}
    return waiting, reserved


def _task_id(message: dict[str, Any]) -> str:
    return str(message.get("headers", {}).get("id"))


def sweep(
    session_factory: sessionmaker[Session], client: redis.Redis, dispatcher: JobDispatcher, settings: Settings
) -> list[str]:
    """Re-dispatch the jobs whose message is gone (see the module docstring); returns their ids."""
    with session_factory() as session:
        queued = jobs_service.list_stale_queued(
            session, utcnow() - timedelta(seconds=settings.sweep_min_age_s)
        )
        abandoned = jobs_service.list_abandoned(session)
    if not queued and not abandoned:
        return []
    waiting, reserved = message_job_ids(client, GPU_QUEUE)
    lost = [job for job in queued if job not in waiting | reserved] + [
        j for j in abandoned if j not in waiting
    ]
    for job_id in lost:
        log.warning("sweeper: job %s has no message; dispatching it again", job_id)
        dispatcher.dispatch(job_id)
    return lost


def expire_records(session_factory: sessionmaker[Session], settings: Settings) -> None:
    """Retention: idempotency answers past ``idempotency_ttl_s``, webhook events past their delivery
    window."""
    with session_factory.begin() as session:
        idempotency.expire(session, settings.idempotency_ttl_s)
        webhooks_service.expire_events(session, settings, utcnow())


def _sweep_forever(settings: Settings) -> None:
    # Its own engine: this thread lives in the worker's parent, whose pool children must not share its
    # connections.
    session_factory = make_session_factory(make_engine(settings.database_url, pool_size=1))
    client = redis.Redis.from_url(settings.redis_url)
    dispatcher = CeleryDispatcher(settings.redis_url)
    store = worker_store(settings.storage_url, settings.cache_dir, settings.cache_max_bytes)
    while True:  # first sweep at start-up: jobs lost while no worker ran are picked up at once
        try:
            evict_purged(store, session_factory)  # every worker: its own cache
            if client.set(
                SWEEP_LOCK, socket.gethostname(), nx=True, ex=max(1, settings.sweep_interval_s - 1)
            ):
                sweep(session_factory, client, dispatcher, settings)
                expire_records(session_factory, settings)
        except Exception:
            log.exception("sweeper: sweep failed; trying again in %s s", settings.sweep_interval_s)
        time.sleep(settings.sweep_interval_s)


@worker_ready.connect
def _start_sweeper(**_kwargs: Any) -> None:
    threading.Thread(target=_sweep_forever, args=(Settings(),), name="lethe-sweeper", daemon=True).start()


@worker_ready.connect
def _start_webhooks(**_kwargs: Any) -> None:
    """Webhook delivery beside the sweeper, in every worker (worker/webhooks.py)."""
    webhooks.start(Settings())
