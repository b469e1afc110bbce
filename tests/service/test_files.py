"""Files named in request bodies: only regular files inside the data root, within their size limits, and
bodies within theirs; every refusal a quick problem that leaks nothing about the rest of the filesystem."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.core.limits import ConcurrencyLimit
from service.core.settings import Settings
from tests.service.conftest import checkpoint_bytes, dataset_body, spec, write_array
from tests.service.test_datasets import assert_problem

Post = Callable[[str], Any]


@pytest.fixture(params=["checkpoint_path", "array_path"])
def post_path(request: pytest.FixtureRequest, client: TestClient, tmp_path: Path) -> Post:
    """POST /models with a ``checkpoint_path``, or POST /datasets with an ``array_path``."""
    if request.param == "checkpoint_path":
        dataset = client.post("/datasets", json=dataset_body(write_array(tmp_path / "toy.npz", 10))).json()

        def post_model(path: str) -> Any:
            body = {"name": f"m{time.monotonic_ns()}", "dataset_id": dataset["id"], "spec": spec(),
                    "checkpoint_path": path}  # fmt: skip
            return client.post("/models", json=body)

        return post_model

    def post_dataset(path: str) -> Any:
        body = dataset_body(tmp_path / "unused.npz", name=f"d{time.monotonic_ns()}")
        return client.post("/datasets", json={**body, "array_path": path})

    return post_dataset


@pytest.fixture
def good_file(post_path: Post, tmp_path: Path) -> str:
    """A valid file of the kind ``post_path`` registers, inside the data root."""
    (tmp_path / "inputs").mkdir(exist_ok=True)
    if post_path.__name__ == "post_model":
        path = tmp_path / "inputs" / "good.safetensors"
        path.write_bytes(checkpoint_bytes())
    else:
        path = write_array(tmp_path / "inputs" / "good.npz", 10)
    return str(path)


def _timed(post: Post, path: str) -> Any:
    started = time.monotonic()
    answer = post(path)
    assert time.monotonic() - started < 1.0, "a refusal must be quick"
    return answer


@pytest.fixture
def outside(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A directory that is not the data root (the tests' root is their own tmp_path)."""
    yield tmp_path_factory.mktemp("elsewhere")


def test_a_file_inside_the_root_is_read_by_absolute_or_relative_path(
    post_path: Post, good_file: str, tmp_path: Path
) -> None:
    assert post_path(good_file).status_code == 201
    assert post_path(os.path.relpath(good_file, tmp_path)).status_code == 201
    # A symlink that stays inside the root is followed.
    link = tmp_path / "inputs" / "link"
    link.symlink_to(good_file)
    assert post_path(str(link)).status_code == 201


@pytest.mark.parametrize("path", ["/etc/passwd", "/dev/zero", "../../../../etc/passwd", "/nonexistent/x"])
def test_paths_outside_the_root_are_refused_without_saying_what_is_there(post_path: Post, path: str) -> None:
    answer = _timed(post_path, path)
    problem = assert_problem(answer, 422, "path-outside-data-root")
    assert "passwd" not in answer.text and "zero" not in answer.text and "nonexistent" not in answer.text
    assert problem["field"] in ("checkpoint_path", "array_path")


def test_a_symlink_out_of_the_root_is_refused(post_path: Post, tmp_path: Path, outside: Path) -> None:
    secret = outside / "secret.safetensors"
    secret.write_bytes(checkpoint_bytes())
    link = tmp_path / "escape"
    link.symlink_to(secret)
    assert_problem(_timed(post_path, str(link)), 422, "path-outside-data-root")


def test_a_fifo_a_directory_and_a_missing_file_are_refused(post_path: Post, tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)  # nothing ever writes: reading it would block forever
    assert_problem(_timed(post_path, str(fifo)), 422, "not-a-regular-file")
    (tmp_path / "folder").mkdir()
    assert_problem(_timed(post_path, str(tmp_path / "folder")), 422, "not-a-regular-file")
    assert_problem(_timed(post_path, "missing.bin"), 422, "file-not-found")


def test_a_file_over_the_limit_is_refused(post_path: Post, good_file: str, settings: Settings) -> None:
    settings.max_checkpoint_bytes = settings.max_array_bytes = 64
    problem = assert_problem(_timed(post_path, good_file), 422, "file-too-large")
    assert problem["limit"] == 64


def test_the_api_still_answers_after_every_refusal(
    client: TestClient, post_path: Post, tmp_path: Path
) -> None:
    fifo = tmp_path / "pipe2"
    os.mkfifo(fifo)
    for path in ("/dev/zero", str(fifo), "/etc/passwd"):
        assert post_path(path).status_code == 422
    assert client.get("/models").status_code == 200


def test_json_bodies_over_the_limit_are_413(client: TestClient, settings: Settings, tmp_path: Path) -> None:
    settings.max_body_bytes = 2_000
    body = dataset_body(write_array(tmp_path / "big.npz", 10))
    body["samples"] *= 20  # about 2.6 kB of JSON
    assert_problem(client.post("/datasets", json=body), 413, "payload-too-large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is counted as the body arrives
        yield b'{"name": "x", "array_path": "big.npz", "samples": ['
        for _ in range(200):
            yield b'{"sample_id": "s", "row": 0, "split": "train"},'
        yield b"]}"

    chunked = client.post("/datasets", content=chunks(), headers={"Content-Type": "application/json"})
    assert_problem(chunked, 413, "payload-too-large")
    assert client.get("/models").status_code == 200


def test_an_upload_over_the_checkpoint_limit_is_413(
    client: TestClient, settings: Settings, tmp_path: Path
) -> None:
    dataset = client.post("/datasets", json=dataset_body(write_array(tmp_path / "toy.npz", 10))).json()
    settings.max_checkpoint_bytes = 100
    form = {"name": "up", "dataset_id": dataset["id"], "spec": '{"architecture": "mnist_cnn"}'}
    answer = client.post("/models/upload", data=form, files={"checkpoint": ("c.safetensors", b"x" * 5_000)})
    assert_problem(answer, 413, "payload-too-large")


def test_at_most_the_configured_number_of_requests_are_inside_the_app_at_once() -> None:
    """The others wait before the app (holding no connection); liveness is never queued behind them."""
    inside, most = 0, 0

    async def app(scope: Any, receive: Any, send: Any) -> None:
        nonlocal inside, most
        inside += 1
        most = max(most, inside)
        await asyncio.sleep(0.01)
        inside -= 1

    limited = ConcurrencyLimit(app, limit=3)

    async def burst() -> None:
        requests = [limited({"type": "http", "path": "/jobs"}, None, None) for _ in range(20)]  # type: ignore[arg-type]
        await asyncio.gather(*requests)

    asyncio.run(burst())
    assert most == 3
    most = 0

    async def probes() -> None:
        async with limited._slots, limited._slots, limited._slots:  # the app is full
            await asyncio.wait_for(limited({"type": "http", "path": "/healthz"}, None, None), 1)  # type: ignore[arg-type]

    asyncio.run(probes())
    assert most == 1
