"""``lethe api | worker | migrate | demo``. Handlers import what they need when they run: ``lethe api`` and
``lethe migrate`` never load torch, ``lethe worker`` loads it only in the task."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(subparsers: Any) -> None:
    api = subparsers.add_parser("api", help="serve the HTTP API (uvicorn on LETHE_API_HOST:LETHE_API_PORT)")
    api.set_defaults(handler=_api)

    worker = subparsers.add_parser("worker", help="run a Celery worker: queue gpu, one job at a time")
    worker.add_argument("--pool", choices=("solo", "prefork"), default="solo")
    worker.add_argument("--loglevel", default="INFO")
    worker.set_defaults(handler=_worker)

    migrate = subparsers.add_parser("migrate", help="apply the database migrations (alembic upgrade head)")
    migrate.set_defaults(handler=_migrate)

    demo = subparsers.add_parser(
        "demo", help="the whole flow on mnist5k in one process: SQLite, in-process worker, real HTTP"
    )
    demo.add_argument("--epochs", type=int, default=10, help="epochs of the initial model (paper A.2: 10)")
    demo.add_argument(
        "--serve", action="store_true", help="then keep the API up and print the console's address and tokens"
    )
    demo.set_defaults(handler=_demo)


def _api(_args: argparse.Namespace) -> int:
    import uvicorn

    from service.app import create_app
    from service.core.logs import configure
    from service.core.settings import Settings

    settings = Settings()
    configure(settings.log_format, settings.log_level)
    # The app writes its own access line (with the request id); uvicorn keeps the root logger's format.
    uvicorn.run(
        create_app(settings, freeze_startup_heap=True),
        host=settings.api_host,
        port=settings.api_port,
        log_config=None,
        access_log=False,
    )
    return 0


def _worker(args: argparse.Namespace) -> int:
    from service.dispatch import GPU_QUEUE
    from worker.celery_app import app

    # One job per worker process: a GPU runs one job at a time; start one worker per GPU.
    app.worker_main(["worker", "-Q", GPU_QUEUE, "-c", "1", "--pool", args.pool, "--loglevel", args.loglevel])
    return 0


def _migrate(_args: argparse.Namespace) -> int:
    from service.core.database import migrate
    from service.core.settings import Settings

    migrate(Settings().database_url)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from worker.demo import run_demo

    return run_demo(initial_epochs=args.epochs, serve=args.serve)
