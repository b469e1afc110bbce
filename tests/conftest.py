from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

# Two cores, several processes: keep every test process on one intra-op thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
# Tests register one input file many times; the service deletes an input once stored by default
# (LETHE_CONSUME_INPUTS), which tests/service/test_purge.py checks with it on.
os.environ.setdefault("LETHE_CONSUME_INPUTS", "false")


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """An S3-compatible server of the test session's own (moto's standalone server on a spare port); the
    S3 client settings that reach it are in os.environ while it runs."""
    from worker.bench.common import s3_server

    with s3_server(tmp_path_factory.mktemp("s3")) as env:
        yield env


@pytest.fixture
def s3_url(s3_endpoint: dict[str, str]) -> str:
    """``s3://bucket/prefix`` of a fresh bucket on the session's S3 server."""
    from worker.bench.common import new_bucket_url

    return new_bucket_url()
