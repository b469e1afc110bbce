"""Service benchmark: POST /deletion-requests at a fixed rate, and a job's overhead before its first step.

``python -m worker.bench.api_load`` against the local Postgres (a fresh database, dropped afterwards) and
Redis (one database index, flushed): uvicorn serves ``service.app:create_served_app`` in a subprocess with
the real Celery dispatcher and no worker, so each request commits its request + job rows and publishes a
message. Loopback only; the count and the duration are bounded. The load is open-loop: requests leave on
a fixed schedule and latency runs from the scheduled send, so a slow server cannot hide its queueing (no
coordinated omission).

Pick-up to first step: a job of the same 5,000-sample dataset run by ``worker.pipeline.run_job`` in this
process; the time from the call (claim, checkpoint load and hash check, sample resolution, array reads) to the
engine's first optimiser step, after which the job is canceled.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

import worker.pipeline as pipeline
import worker.pipeline.unlearn as unlearn_stage
from service.core.database import make_engine, make_session_factory
from service.core.settings import Settings
from service.dispatch import CeleryDispatcher
from service.storage import open_store
from worker.bench import load_client
from worker.bench.common import (
    bench_backends,
    bench_headers,
    free_port,
    machine,
    wait_until_up,
    write_result,
)
from worker.checkpoints import state_dict_to_bytes
from worker.engine.models import build_model
from worker.engine.progress import UnlearningCancelled
from worker.engine.spec import mnist_cnn_spec

REDIS_URL = os.environ.get("LETHE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/15")
ROWS, TRAIN_ROWS, PER_SUBJECT = 5_000, 4_000, 10


def _fixture_files(directory: Path) -> tuple[Path, Path, dict[str, Any]]:
    """A 5,000-sample MNIST-shaped array (4,000 train in subjects of 10, 1,000 audit) and a checkpoint."""
    rng = np.random.default_rng(0)
    array_path = directory / "bench.npz"
    np.savez(array_path, x=rng.random((ROWS, 1, 28, 28), dtype=np.float32))
    labels = rng.integers(0, 10, ROWS)
    samples = [
        {"sample_id": f"s{row:05d}", "row": row, "label": int(labels[row]),
         "split": "train" if row < TRAIN_ROWS else "audit",
         "subject_id": f"subject-{row // PER_SUBJECT:04d}" if row < TRAIN_ROWS else None}
        for row in range(ROWS)
    ]  # fmt: skip
    checkpoint_path = directory / "model.safetensors"
    checkpoint_path.write_bytes(state_dict_to_bytes(build_model(mnist_cnn_spec())))
    body = {"name": "bench", "array_path": str(array_path), "num_classes": 10, "samples": samples}
    return array_path, checkpoint_path, body


# Where a POST's time goes: py-spy samples of the API process, each attributed to the first phase (service
# module) its stack passes through, and separately to the library its innermost frame is in.
PHASES = (
    ("authentication", "service/clients/"),
    ("rate limit", "service/core/rate_limits.py"),
    ("idempotency record", "service/idempotency/"),
    ("audit trail append", "service/trail/"),
    ("erasure targets and job (coalescing)", "service/erasures/"),
    ("request validation and insert", "service/deletion_requests/service.py"),
    ("dispatch (Celery publish)", "service/deletion_requests/routes.py:dispatch_all"),
    ("response building", "service/deletion_requests/routes.py"),
)
LAYERS = (
    ("Postgres driver (psycopg)", "psycopg"),
    ("SQLAlchemy", "sqlalchemy"),
    ("Celery, kombu, redis client", ("kombu", "celery", "redis")),
    ("pydantic, JSON", ("pydantic", "json", "fastapi/encoders")),
    ("HTTP server and framework", ("uvicorn", "starlette", "fastapi", "anyio", "h11", "httptools")),
    ("Lethe's own code", "/service/"),
)


def _profile(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes] | None:
    """py-spy sampling the API process (every thread) for ``seconds``; None where py-spy is missing."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        return None
    return subprocess.Popen(
        # A low rate: py-spy walks every thread's stack at each sample (uvicorn's pool has 40), and at
        # 200 Hz it took most of a core from the server it measured.
        [spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "20",
         "--format", "raw", "--output", str(out), "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


OUTSIDE = "outside the POST handler (HTTP parsing, routing, event loop)"


def _in_phase(frame: str, needle: str) -> bool:
    """``needle``: a file, or ``file:function``."""
    path, _, function = needle.partition(":")
    return path in frame and (not function or frame.startswith(f"{function} "))


def _matches(frame: str, needles: str | tuple[str, ...]) -> bool:
    return any(needle in frame for needle in ((needles,) if isinstance(needles, str) else needles))


def where_time_goes(stacks_file: Path) -> dict[str, Any]:
    """Shares (%) of the API's busy samples by phase of the POST path and by innermost library."""
    phases: dict[str, int] = {}
    layers: dict[str, int] = {}
    unplaced: dict[str, int] = {}  # innermost frames of "other": what to look at next
    total = 0
    for line in stacks_file.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        phase = next(
            (name for name, needle in PHASES if any(_in_phase(frame, needle) for frame in frames)), OUTSIDE
        )
        phases[phase] = phases.get(phase, 0) + count
        layer = next((name for name, needles in LAYERS if _matches(frames[-1], needles)), "other")
        layers[layer] = layers.get(layer, 0) + count
        if layer == "other":
            unplaced[frames[-1]] = unplaced.get(frames[-1], 0) + count

    def shares(counts: dict[str, int]) -> dict[str, float]:
        return {k: round(100 * v / total, 1) for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}

    top_other = dict(sorted(shares(unplaced).items(), key=lambda kv: -kv[1])[:8])
    return {"samples": total, "by_phase_pct": shares(phases), "by_innermost_library_pct": shares(layers),
            "other_innermost_frames_pct": top_other}  # fmt: skip


def _pickup_to_first_step(
    client: httpx.Client, model: str, settings: Settings, repeats: int
) -> dict[str, Any]:
    session_factory = make_session_factory(make_engine(settings.database_url))
    store = open_store(settings.storage_url)
    engine_unlearn = unlearn_stage.unlearn
    first_step: list[float] = []

    def on_step(_event: Any) -> None:
        first_step.append(time.perf_counter())
        raise UnlearningCancelled("benchmark: first step reached")

    def timed_unlearn(*args: Any, **kwargs: Any) -> Any:
        return engine_unlearn(*args, **{**kwargs, "progress": on_step})

    unlearn_stage.unlearn = timed_unlearn
    # The load's jobs are queued too, with earlier due dates: out of the way, so each message takes its own.
    for job in (
        client.get("/jobs", params={"state": "queued", "limit": 500}).raise_for_status().json()["items"]
    ):
        # Canceling a batch settles each of its requests (and generates its report) in one transaction: a
        # job holding the load's 1,800 requests took over a minute here.
        client.post(f"/jobs/{job['id']}/cancel", timeout=600).raise_for_status()
    # A model's first job builds its audit reference set: built here first, so that what is timed is the
    # pick-up of an ordinary job (2 references of the model's 1-epoch recipe: the model is a fixture).
    build = client.post(f"/models/{model}/audit-references", json={"references": 2}).raise_for_status()
    state = pipeline.run_job(
        build.json()["id"], session_factory=session_factory, store=store, settings=settings,
        worker_id="bench", dispatcher=CeleryDispatcher(settings.redis_url),
    )  # fmt: skip
    assert state == "succeeded", state
    seconds = []
    try:
        for i in range(repeats):
            body = {"model": model, "subject_id": f"subject-{i:04d}", "config": {"epochs": 1}}
            request = client.post("/deletion-requests", json=body).raise_for_status().json()
            job_id = request["erasures"][0]["job_id"]
            started = time.perf_counter()
            state = pipeline.run_job(
                job_id, session_factory=session_factory, store=store, settings=settings, worker_id="bench",
                dispatcher=CeleryDispatcher(settings.redis_url),
            )  # fmt: skip
            assert state == "canceled", state
            seconds.append(first_step[-1] - started)
    finally:
        unlearn_stage.unlearn = engine_unlearn
    return {"repeats": repeats, "seconds": [round(s, 3) for s in seconds],
            "median_s": round(statistics.median(seconds), 3)}  # fmt: skip


def run(rate: float, duration: float, max_requests: int, repeats: int, profile: bool) -> dict[str, Any]:
    torch.set_num_threads(1)
    server = None
    with (
        bench_backends("lethe_bench", REDIS_URL) as database_url,
        tempfile.TemporaryDirectory(prefix="lethe-bench-") as tmp,
    ):
        try:
            settings = Settings(
                database_url=database_url,
                redis_url=REDIS_URL,
                storage_url=str(Path(tmp) / "store"),
                batch_wait_s=0,
                data_dir=Path(tmp),
            )
            _array, checkpoint_path, dataset_body = _fixture_files(Path(tmp))
            port = free_port()
            env = {**os.environ, "LETHE_DATABASE_URL": database_url, "LETHE_REDIS_URL": REDIS_URL,
                   "LETHE_STORAGE_URL": settings.storage_url, "LETHE_DISPATCHER": "celery",
                   "LETHE_BATCH_WAIT_S": "0", "LETHE_DATA_DIR": tmp,
                   # The limiter runs (its cost is measured) but does not cap the offered load.
                   "LETHE_RATE_LIMIT": "1000000/minute"}  # fmt: skip
            server = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "--factory", "service.app:create_served_app",
                 "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", "--no-access-log"],
                env=env,
            )  # fmt: skip
            url = f"http://127.0.0.1:{port}"
            headers = bench_headers(database_url)
            with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
                wait_until_up(client)
                dataset_id = client.post("/datasets", json=dataset_body).raise_for_status().json()["id"]
                model = {"name": "bench-cnn", "dataset_id": dataset_id, "spec": mnist_cnn_spec().to_dict(),
                         "checkpoint_path": str(checkpoint_path),
                         "training_recipe": {"epochs": 1}}  # fmt: skip
                client.post("/models", json=model).raise_for_status()
                count = min(max_requests, int(rate * duration))
                stacks = Path(tmp) / "api-stacks.txt"
                spy = _profile(server.pid, count / rate, stacks) if profile else None
                subjects = TRAIN_ROWS // PER_SUBJECT
                load = asyncio.run(load_client.open_loop(
                    url, headers, "/deletion-requests",
                    lambda i: {"model": "bench-cnn", "subject_id": f"subject-{i % subjects:04d}",
                               "config": {"epochs": 1}},
                    rate, count,
                ))  # fmt: skip
                ledger = load_client.ledger(database_url, "bench-cnn", load.pop("accepted_ids"), count)
                if spy is not None:
                    spy.wait(timeout=120)
                    load["profile"] = where_time_goes(stacks)
                pickup = _pickup_to_first_step(client, "bench-cnn", settings, repeats)
        finally:
            if server is not None:
                server.terminate()
                server.wait(timeout=30)
    return {
        "benchmark": "service",
        "dataset_samples": ROWS,
        "samples_per_request": PER_SUBJECT,
        "post_deletion_requests": load,
        "ledger": ledger,
        "pickup_to_first_step": pickup,
        "machine": machine(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rate", type=float, default=50.0, help="requests per second (open loop)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--max-requests", type=int, default=20_000)
    parser.add_argument("--profile", action="store_true", help="sample the API with py-spy during the load")
    parser.add_argument("--repeats", type=int, default=3, help="jobs timed from pick-up to first step")
    parser.add_argument("--json", type=Path, default=Path("results/bench-api.json"))
    args = parser.parse_args(argv)
    result = run(args.rate, args.duration, args.max_requests, args.repeats, args.profile)
    write_result(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
