"""Lethe's ``POST /deletion-requests`` against its stack's floor, in one run, with one load client.

``python -m worker.bench.api_compare`` (``make bench-api``), against the local Postgres (a fresh database,
dropped afterwards) and Redis (one index, flushed). Each server is one uvicorn process in a subprocess (both
up throughout, loaded one at a time), loaded by :mod:`worker.bench.load_client` from this process:

1. ``--rounds`` alternated rounds of the baseline (:mod:`worker.bench.baseline_app`: validate a similar
   body, insert one row, one transaction) and of Lethe (authenticated, rate-limited far above the load,
   idempotent, every request with its samples, erasure target, place in its model's open job, trail events),
   each ``--connections`` senders back to back for ``--duration`` s: saturation throughputs, and Lethe's
   share of the baseline's per round (their median is the headline: one round each way can fall in a
   minute when the machine is busier);
2. ``--rate-runs`` runs of Lethe at a fixed ``--rate`` (open loop, latency from the scheduled send);
3. ``POST /deletion-requests/bulk``: ``--bulk`` requests in calls of 1,000 items: accepted per second;
4. ``POST /jobs/{id}/cancel`` of one job holding ``--cancel`` requests (queued in bulk): seconds.

Every Lethe run's database is checked against what the client was told (the ledger: lost, duplicated by
key). The ratios are computed within the run, so the machine's other load weighs on both sides.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from safetensors.numpy import save as save_safetensors

from worker.bench import load_client
from worker.bench.common import bench_backends, bench_headers, free_port, machine, wait_until_up, write_result

REDIS_URL = os.environ.get("LETHE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/15")
ROWS, TRAIN_ROWS, PER_SUBJECT = 5_000, 4_000, 10
SUBJECTS = TRAIN_ROWS // PER_SUBJECT
SHAPE = (1, 4, 4)
BULK_ITEMS = 1_000


@contextlib.contextmanager
def _served(factory: str, env: dict[str, str]) -> Iterator[str]:
    """``uvicorn --factory factory`` in a subprocess on a free loopback port, until the block ends."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", factory, "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "warning", "--no-access-log"],
        env={**os.environ, **env},
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url) as probe:
            wait_until_up(probe)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=60)


def _dataset_body(directory: Path) -> dict[str, Any]:
    """5,000 samples (4,000 train in data subjects of 10, 1,000 audit) of a small array."""
    array_path = directory / "bench.npz"
    np.savez(array_path, x=np.zeros((ROWS, *SHAPE), dtype=np.float32))
    samples = [
        {"sample_id": f"s{row:05d}", "row": row, "label": row % 10,
         "split": "train" if row < TRAIN_ROWS else "audit",
         "subject_id": f"subject-{row // PER_SUBJECT:04d}" if row < TRAIN_ROWS else None}
        for row in range(ROWS)
    ]  # fmt: skip
    return {"name": "bench", "array_path": str(array_path), "num_classes": 10, "samples": samples}


def _register_model(client: httpx.Client, directory: Path, dataset_id: str, name: str) -> None:
    checkpoint = directory / f"{name}.safetensors"
    checkpoint.write_bytes(save_safetensors({"fc.weight": np.zeros((10, 16), dtype=np.float32)}))
    spec = {"architecture": "mnist_cnn", "num_classes": 10, "input_shape": list(SHAPE),
            "feature_layer": "features.block2"}  # fmt: skip
    body = {"name": name, "dataset_id": dataset_id, "spec": spec, "checkpoint_path": str(checkpoint)}
    client.post("/models", json=body).raise_for_status()


def _body_of(model: str) -> load_client.BodyOf:
    """The i-th request on ``model``: one data subject (10 samples), a method configuration."""
    return lambda i: {"model": model, "subject_id": f"subject-{i % SUBJECTS:04d}", "config": {"epochs": 1}}


def _answered(run: dict[str, Any], server: str) -> dict[str, Any]:
    """The run, once every request was answered 200 or 202: a server that refused requests (a 422 from a
    broken handler, say) would be timed on its refusals, not on the work."""
    refused = {code: n for code, n in run["statuses"].items() if code not in ("200", "202")}
    if refused:
        raise RuntimeError(f"{server} answered {refused} (by status): the run measures nothing")
    return run


def _checked(database_url: str, model: str, run: dict[str, Any], prefix: str) -> dict[str, Any]:
    _answered(run, "Lethe")
    accepted = run.pop("accepted_ids")
    run["ledger"] = load_client.ledger(database_url, model, accepted, run["requests"], prefix)
    return run


def _bulk(client: httpx.Client, model: str, count: int, prefix: str) -> tuple[dict[str, Any], dict[int, str]]:
    """``count`` requests in calls of :data:`BULK_ITEMS`, each with its key; the ids accepted, by index."""
    body_of = _body_of(model)
    accepted: dict[int, str] = {}
    calls = []
    start = time.perf_counter()
    for first in range(0, count, BULK_ITEMS):
        items = [
            {**body_of(i), "idempotency_key": f"{prefix}{i}"}
            for i in range(first, min(count, first + BULK_ITEMS))
        ]
        sent = time.perf_counter()
        answer = client.post("/deletion-requests/bulk", json={"items": items}, timeout=600).raise_for_status()
        calls.append(round(time.perf_counter() - sent, 3))
        for item in answer.json()["items"]:
            if item["request"] is not None:
                accepted[first + item["index"]] = item["request"]["id"]
    elapsed = time.perf_counter() - start
    result = {"requests": count, "calls_s": calls, "accepted": len(accepted),
           "accepted_per_s": round(len(accepted) / elapsed, 1), "elapsed_s": round(elapsed, 3)}  # fmt: skip
    return result, accepted


def _baseline_round(url: str, connections: int, duration: float) -> dict[str, Any]:
    body = {"model": "bench", "subject_id": "subject-0001", "config": {"epochs": 1}}
    run = asyncio.run(
        load_client.closed_loop(url, {}, "/deletion-requests", lambda _i: body, connections, duration)
    )
    _answered(run, "the baseline").pop("accepted_ids")
    return run


def run(
    duration: float, connections: int, rate: float, bulk: int, cancel: int, rounds: int, rate_runs: int
) -> dict[str, Any]:
    with (
        bench_backends("lethe_bench_compare", REDIS_URL) as database_url,
        tempfile.TemporaryDirectory(prefix="lethe-bench-") as tmp,
    ):
        directory = Path(tmp)
        env = {"LETHE_DATABASE_URL": database_url, "LETHE_REDIS_URL": REDIS_URL,
               "LETHE_STORAGE_URL": str(directory / "store"), "LETHE_DISPATCHER": "celery",
               "LETHE_BATCH_WAIT_S": "0", "LETHE_DATA_DIR": tmp,
               # One open job per model takes every request of the run (the cancel's job holds them all).
               "LETHE_BATCH_MAX_SAMPLES": str(10 * max(cancel, bulk) * PER_SUBJECT),
               # The limiter runs (its cost is measured) but does not cap the offered load.
               "LETHE_RATE_LIMIT": "1000000/minute"}  # fmt: skip
        headers = bench_headers(database_url)
        with (
            # Both served throughout (the idle one costs nothing), so their rounds can alternate.
            _served(
                "worker.bench.baseline_app:create_app", {"LETHE_BENCH_BASELINE_URL": database_url}
            ) as floor,
            _served("service.app:create_served_app", env) as url,
            httpx.Client(base_url=url, headers=headers) as client,
        ):
            dataset_id = (
                client.post("/datasets", json=_dataset_body(directory), timeout=120)
                .raise_for_status()
                .json()["id"]
            )
            saturation_models = [f"bench-saturation-{i}" for i in range(rounds)]
            rate_models = [f"bench-rate-{i}" for i in range(rate_runs)]
            for name in (*saturation_models, *rate_models, "bench-bulk", "bench-cancel"):
                _register_model(client, directory, dataset_id, name)
            path = "/deletion-requests"
            baseline, saturation = [], []
            # Alternated rounds: a change in the machine's other load between them weighs on both sides.
            for model in saturation_models:
                baseline.append(_baseline_round(floor, connections, duration))
                saturated = load_client.closed_loop(
                    url, headers, path, _body_of(model), connections, duration, f"{model}-"
                )
                saturation.append(_checked(database_url, model, asyncio.run(saturated), f"{model}-"))
            fixed = []
            for model in rate_models:
                count = int(rate * duration)
                paced = load_client.open_loop(url, headers, path, _body_of(model), rate, count, f"{model}-")
                fixed.append(_checked(database_url, model, asyncio.run(paced), f"{model}-"))
            bulk_run, accepted = _bulk(client, "bench-bulk", bulk, "bulk-")
            bulk_run["ledger"] = load_client.ledger(database_url, "bench-bulk", accepted, bulk, "bulk-")
            _cancel_run, cancel_accepted = _bulk(client, "bench-cancel", cancel, "cancel-")
            request = client.get(f"/deletion-requests/{cancel_accepted[0]}").raise_for_status().json()
            job_id = request["erasures"][0]["job_id"]
            held = len(client.get(f"/jobs/{job_id}").raise_for_status().json()["request_ids"])
            started = time.perf_counter()
            canceled = client.post(f"/jobs/{job_id}/cancel", timeout=600).raise_for_status().json()
            cancel_s = time.perf_counter() - started
            settled = sum(
                client.get(f"/deletion-requests/{request_id}").json()["state"] == "canceled"
                for request_id in canceled["request_ids"]
            )
    shares = [
        round(lethe["throughput_per_s"] / floor["throughput_per_s"], 3)
        for lethe, floor in zip(saturation, baseline, strict=True)
    ]
    return {
        "benchmark": "api-compare",
        "duration_s": duration,
        "connections": connections,
        "rounds": rounds,
        "baseline_saturation": baseline,
        "lethe_saturation": saturation,
        "lethe_throughput_share_of_baseline": {"per_round": shares, "median": statistics.median(shares)},
        "lethe_fixed_rate": fixed,
        "lethe_fixed_rate_worst_p99_ms": max(run["latency_ms"]["p99"] for run in fixed),
        "lethe_bulk": bulk_run,
        "lethe_cancel": {
            "requests_in_job": held,
            "seconds": round(cancel_s, 3),
            "requests_settled": settled,
            "progress": canceled["progress"],
        },
        "machine": machine(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of each load")
    parser.add_argument("--connections", type=int, default=8, help="closed-loop senders (saturation)")
    parser.add_argument("--rate", type=float, default=50.0, help="requests per second of the fixed-rate run")
    parser.add_argument("--bulk", type=int, default=5_000, help="requests posted in bulk")
    parser.add_argument("--cancel", type=int, default=2_000, help="requests in the job that is canceled")
    parser.add_argument("--rounds", type=int, default=3, help="alternated saturation rounds of each server")
    parser.add_argument("--rate-runs", type=int, default=2, help="fixed-rate runs of Lethe")
    parser.add_argument("--json", type=Path, default=Path("docs/results/bench-api-compare.json"))
    args = parser.parse_args(argv)
    result = run(
        args.duration, args.connections, args.rate, args.bulk, args.cancel, args.rounds, args.rate_runs
    )
    write_result(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
