"""What the service benchmarks share: a database and a Redis index of their own, an API client's token, a
free loopback port, the machine's description, and writing a result where the README says."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
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


@contextlib.contextmanager
def s3_server(directory: Path) -> Iterator[dict[str, str]]:
    """An S3-compatible server of one's own (moto's standalone server, a dev dependency) on a spare port;
    ``os.environ`` holds the S3 client settings that reach it while it runs (child processes inherit them)."""
    port = free_port()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    previous = {key: os.environ.get(key) for key in env}
    log = directory / "moto.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    os.environ.update(env)
    try:
        import boto3

        client = boto3.client("s3")
        deadline = time.monotonic() + 30
        while True:
            try:
                client.list_buckets()
                break
            except Exception:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"moto_server did not start: {log.read_text()[-2000:]}") from None
                time.sleep(0.2)
        yield env
    finally:
        server.terminate()
        server.wait(timeout=30)
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def new_bucket_url() -> str:
    """``s3://bucket/store`` of a new bucket on the S3 server the environment names."""
    import boto3

    bucket = f"lethe-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/store"


def wait_until_up(client: httpx.Client, timeout_s: float = 30) -> None:
    """Until the API ``client`` talks to answers its liveness probe."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.get("/healthz").raise_for_status()
            return
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


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
