"""What the service benchmarks share: a database and a Redis index of their own, an API client's token, a
free loopback port, the machine's description, and writing a result where the README says."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import redis

from service.clients.service import ADMIN, create_client
from service.core.database import make_engine, make_session_factory, migrate

ADMIN_DSN = os.environ.get("LETHE_BENCH_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
BENCH_TENANT = "bench"


def bench_headers(database_url: str, name: str = "bench") -> dict[str, str]:
    """The Authorization header of a new admin client of the bench's tenant."""
    engine = make_engine(database_url)
    try:
        with make_session_factory(engine).begin() as session:
            token = create_client(session, name, BENCH_TENANT, [ADMIN]).token
    finally:
        engine.dispose()
    return {"Authorization": f"Bearer {token}"}


@contextlib.contextmanager
def bench_backends(prefix: str, redis_url: str) -> Iterator[str]:
    """A fresh, migrated Postgres database (its SQLAlchemy URL) and the Redis index of ``redis_url`` flushed;
    the database dropped and the index flushed again afterwards, whatever happens."""
    database = f"{prefix}_{os.getpid()}"
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{database}"')
    base = ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    queue = redis.Redis.from_url(redis_url)
    queue.flushdb()
    try:
        url = f"{base}/{database}"
        migrate(url)
        yield url
    finally:
        queue.flushdb()
        with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def write_result(result: dict[str, Any], path: Path) -> None:
    """Print the result and write it as JSON to ``path``."""
    print(json.dumps(result, indent=2))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
