"""The Celery application: Redis broker, one GPU job per worker process, Postgres as the source of truth.

Importing this module imports neither torch nor the pipeline (the task imports it when it runs), so the
worker's parent process never initialises CUDA. Run it with ``lethe worker`` (``celery -A worker.celery_app
worker -Q gpu -c 1 --pool solo``).
"""

from __future__ import annotations

from celery import Celery
from celery.signals import setup_logging, worker_init

from service.core.settings import Settings
from service.dispatch import GPU_QUEUE, RUN_JOB_TASK


def create_celery(settings: Settings) -> Celery:
    app = Celery("lethe", broker=settings.redis_url, include=["worker.tasks"])
    app.conf.update(
        # Acknowledge after the job, and requeue when the worker process dies mid-job: a lost worker never
        # loses a job. A redelivered message for a job another worker holds (lease) or finished does nothing.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # One message reserved at a time: a second job waits in Redis where another worker can take it.
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        # Redis redelivers an unacknowledged message after this long: above the longest job, or a running job
        # would be delivered to a second worker (its lease would turn that one away, but it would wait).
        broker_transport_options={"visibility_timeout": settings.job_visibility_timeout_s},
        broker_connection_retry_on_startup=True,
        task_default_queue=GPU_QUEUE,
        task_routes={RUN_JOB_TASK: {"queue": GPU_QUEUE}},
        # Job state lives in Postgres; no result backend.
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
    )
    return app


app = create_celery(Settings())


@setup_logging.connect
def _configure_logging(**_kwargs: object) -> None:
    """The worker logs as the API does (LETHE_LOG_FORMAT): Celery leaves the root logger alone."""
    from service.core.logs import configure

    settings = Settings()
    configure(settings.log_format, settings.log_level)


@worker_init.connect
def _serve_metrics(**_kwargs: object) -> None:
    """The worker's own series (job phases, outcomes) on LETHE_WORKER_METRICS_PORT, when set."""
    from worker.metrics import serve

    serve(Settings().worker_metrics_port)
