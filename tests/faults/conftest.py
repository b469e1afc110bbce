"""Fault tests start and stop their own Postgres cluster (initdb + pg_ctl on a spare port, as the postgres
user) and their own Redis server (a spare port, nothing persisted), never the machine's shared ones."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from worker.bench.common import free_port

BIN = next(Path("/usr/lib/postgresql").glob("*/bin"), None)


def _as_postgres(*command: str) -> list[str]:
    """Postgres refuses to run as root: the commands run as the postgres user when this process is root."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else list(command)


@dataclass
class Cluster:
    directory: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _ctl(self, *args: str) -> None:
        assert BIN is not None  # the fixture checked
        subprocess.run(_as_postgres(str(BIN / "pg_ctl"), "-D", str(self.directory / "data"), *args),
                       check=True, capture_output=True, timeout=60)  # fmt: skip

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.directory}"
        self._ctl("-o", options, "-l", str(self.directory / "log"), "-w", "start")

    def stop(self) -> None:
        self._ctl("-m", "fast", "-w", "stop")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if BIN is None or (shutil.which("runuser") is None and os.geteuid() == 0):
        pytest.fail("the fault tests need PostgreSQL's initdb and pg_ctl (and runuser when run as root)")
    directory = Path(tempfile.mkdtemp(prefix="lethe-faults-pg-"))
    if os.geteuid() == 0:
        shutil.chown(directory, "postgres", "postgres")
    initdb = [
        str(BIN / "initdb"),
        "-D",
        str(directory / "data"),
        "-U",
        "postgres",
        "--auth=trust",
        "-E",
        "UTF8",
    ]
    subprocess.run(_as_postgres(*initdb), check=True, capture_output=True, timeout=120)
    instance = Cluster(directory, free_port())
    instance.start()
    try:
        yield instance
    finally:
        try:
            instance.stop()
        finally:
            shutil.rmtree(directory, ignore_errors=True)


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A ``redis-server`` of the module's own on a spare port: nothing saved, nothing appended, so FLUSHALL
    and a stop lose everything, as a Redis restart without persistence would."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("the fault tests need redis-server")
    directory = tmp_path_factory.mktemp("redis")
    port = free_port()
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", str(directory)]  # fmt: skip
    with (directory / "log").open("ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    server = RedisServer(port, process)
    client = server.client()
    deadline = time.monotonic() + 30
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"redis-server did not start: {(directory / 'log').read_text()[-2000:]}")
            time.sleep(0.05)
    try:
        yield server
    finally:
        client.close()
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
