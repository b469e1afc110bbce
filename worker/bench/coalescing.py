"""Coalescing benchmark: many small deletion requests against real Celery workers, with and without batching.

``python -m worker.bench.coalescing`` (``make bench-coalescing``) on the local Postgres (a fresh database,
dropped afterwards) and Redis (one database index, flushed): uvicorn serves the API in a subprocess, Celery
workers (``--pool solo``, one job at a time, 1 torch thread each) run the jobs, on mnist5k with data subjects
of 5 samples and the default method (MixUnlearn) and audit.

Scenarios, each on a freshly started API and workers with its own settings and its own subjects:
1. ``coalesced``: N requests (one subject each) posted evenly within one minute against one model, one
   worker, the default coalescing (``batch_wait_s`` 30, ``batch_max_samples`` 10,000).
2. ``one_job_per_request``: the same against ``batch_max_samples=1`` (every request its own job).
3. ``four_models_one_worker`` and ``four_models_two_workers``: N requests spread over 4 models, coalesced.

Reported per scenario: seconds from the first POST to the last request completed, worker CPU-seconds (the
worker processes' user + system time, read from /proc) per erased sample, jobs, versions and verdicts; and the
ratios the issue asks for. The model's audit reference set (4 reference models) is built once, before
anything is timed; for a labelled dataset it depends on the dataset and the training recipe only, so the
benchmark registers that one set for each of its models instead of training it four times.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import torch

from service.audit import service as audit_service
from service.core.database import make_engine, make_session_factory
from service.storage import StoredObject
from worker.bench.common import BENCH_TENANT, bench_backends, bench_headers, free_port, machine, write_result
from worker.datasets.builtin import load_dataset
from worker.demo import SEED, dataset_body, train_initial_checkpoint, write_dataset
from worker.engine.config import DEFAULT_METHOD, TrainingConfig
from worker.engine.spec import mnist_cnn_spec

REDIS_URL = os.environ.get("LETHE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
PER_SUBJECT = 5
MODELS = 4
RECIPE = TrainingConfig(epochs=10)  # the demo's recipe: converged, so exact retraining keeps utility
REFERENCES = 4
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its waited-for children (/proc/PID/stat fields 14-17)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(value) for value in fields[11:15]) / CLOCK_TICKS


@dataclass
class Stack:
    url: str
    headers: dict[str, str]  # an admin client's token
    workers: list[subprocess.Popen[bytes]]
    logs: list[Path]

    def worker_cpu(self) -> float:
        return sum(_cpu_seconds(worker.pid) for worker in self.workers)


def _wait_for(predicate: Any, what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.2)


def _api_up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/openapi.json", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def stack(base_env: dict[str, str], tmp: Path, name: str, workers: int, **settings: Any) -> Iterator[Stack]:
    """The API and ``workers`` Celery workers with these ``LETHE_*`` settings; every worker warmed up (its
    first message imports torch) before it is handed over."""
    env = {**base_env, **{f"LETHE_{key.upper()}": str(value) for key, value in settings.items()}}
    port = free_port()
    api = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "service.app:create_served_app", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning", "--no-access-log"],
        env=env,
    )  # fmt: skip
    logs = [tmp / f"{name}-worker-{i}.log" for i in range(workers)]
    processes = []
    for i, log in enumerate(logs):
        with log.open("wb") as out:
            processes.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "celery",
                        "-A",
                        "worker.celery_app",
                        "worker",
                        "-Q",
                        "gpu",
                        "-c",
                        "1",
                        "--pool",
                        "solo",
                        "--loglevel",
                        "INFO",
                        "--without-gossip",
                        "--without-mingle",
                        "-n",
                        f"bench{i}@%h",
                    ],
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(lambda: _api_up(url), "the API did not start")
        for log in logs:
            _wait_for(lambda log=log: "ready." in log.read_text(), f"worker {log} did not start")
        # Warm-up: messages for no job, until every worker has taken one.
        from service.dispatch import CeleryDispatcher

        dispatcher = CeleryDispatcher(env["LETHE_REDIS_URL"])
        for log in logs:
            while "succeeded in" not in log.read_text():
                dispatcher.dispatch("warm-up")
                time.sleep(1.0)
        yield Stack(url, bench_headers(env["LETHE_DATABASE_URL"], f"bench-{name}"), processes, logs)
    finally:
        for process in [api, *processes]:
            process.send_signal(signal.SIGTERM)
        for process in [api, *processes]:
            try:  # a worker finishing a job (a purge, a refresh) can take longer on a loaded machine
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _post_evenly(
    client: httpx.Client, bodies: list[dict[str, Any]], over_s: float
) -> tuple[float, list[str]]:
    """POST the bodies on an even schedule over ``over_s`` seconds; the start time and the request ids."""
    start = time.time()
    ids = []
    for i, body in enumerate(bodies):
        time.sleep(max(0.0, start + i * over_s / len(bodies) - time.time()))
        answer = client.post("/deletion-requests", json=body)
        answer.raise_for_status()
        ids.append(answer.json()["id"])
    return start, ids


def _settle(client: httpx.Client, ids: list[str], timeout_s: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    pending = set(ids)
    settled: dict[str, dict[str, Any]] = {}
    while pending:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(pending)} requests still processing after {timeout_s} s")
        for request_id in list(pending):
            request = client.get(f"/deletion-requests/{request_id}").raise_for_status().json()
            if request["state"] != "processing":
                settled[request_id] = request
                pending.discard(request_id)
        time.sleep(1.0)
    return [settled[request_id] for request_id in ids]


def run_scenario(
    stack_: Stack, models: list[str], subjects: range, over_s: float, timeout_s: float
) -> dict[str, Any]:
    with httpx.Client(base_url=stack_.url, headers=stack_.headers, timeout=60) as client:
        jobs_before = {j["id"] for j in client.get("/jobs", params={"limit": 500}).json()["items"]}
        bodies = [
            {"model": models[i % len(models)], "subject_id": f"subject-{subject:04d}"}
            for i, subject in enumerate(subjects)
        ]
        cpu_before = stack_.worker_cpu()
        start, ids = _post_evenly(client, bodies, over_s)
        posted_s = time.time() - start
        settled = _settle(client, ids, timeout_s)
        cpu = stack_.worker_cpu() - cpu_before
        last = max(datetime.fromisoformat(r["completed_at"]).timestamp() for r in settled)
        jobs = [
            j
            for j in client.get("/jobs", params={"limit": 500}).json()["items"]
            if j["id"] not in jobs_before
        ]
    erased = sum(e["pending_count"] for r in settled for e in r["erasures"] if e["state"] == "completed")
    unlearn_jobs = [j for j in jobs if j["kind"] == "unlearn"]
    verdicts = [e["verdict"] for r in settled for e in r["erasures"]]
    running = sorted(j["timings"]["running_seconds"] for j in unlearn_jobs if j["timings"]["running_seconds"])
    return {
        "requests": len(ids),
        "models": len(models),
        "posted_within_s": round(posted_s, 1),
        "last_completed_after_s": round(last - start, 1),
        "last_completed_after_last_post_s": round(last - start - posted_s, 1),
        "states": dict(Counter(r["state"] for r in settled)),
        "verdicts": dict(Counter(e["verdict"] for r in settled for e in r["erasures"])),
        # Settled with evidence either way: any verdict but `insufficient_power` (and no audit at all).
        "with_evidence_share": round(
            sum(v not in (None, "insufficient_power") for v in verdicts) / len(verdicts), 3
        ),
        "jobs": len(unlearn_jobs),
        "job_states": dict(Counter(j["state"] for j in unlearn_jobs)),
        "job_methods": dict(Counter(j["method"] for j in unlearn_jobs)),
        "rejections": sorted({j["error"]["detail"][:300] for j in unlearn_jobs if j["state"] == "rejected"}),
        "requests_per_job": sorted(len(j["request_ids"]) for j in unlearn_jobs),
        "job_running_s": {
            "median": running[len(running) // 2] if running else None,
            "max": running[-1] if running else None,
        },
        "erased_samples": erased,
        "worker_cpu_s": round(cpu, 1),
        "worker_cpu_s_per_erased_sample": round(cpu / erased, 3) if erased else None,
    }


SCENARIOS = ("coalesced", "one_job_per_request", "four_models_one_worker", "four_models_two_workers")


def run(
    requests: int, over_s: float, timeout_s: float, only: tuple[str, ...] = SCENARIOS, seed: int = SEED
) -> dict[str, Any]:
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    results: dict[str, Any] = {}  # scenario -> its figures
    with (
        bench_backends("lethe_bench_coalescing", REDIS_URL) as database_url,
        tempfile.TemporaryDirectory(prefix="lethe-bench-coalescing-") as directory,
    ):
        tmp = Path(directory)
        dataset = load_dataset("mnist5k")
        array_path = tmp / "mnist5k.npz"
        write_dataset(dataset, array_path)
        spec = mnist_cnn_spec(dataset.num_classes, dataset.input_shape)
        checkpoint = tmp / "initial.safetensors"
        checkpoint.write_bytes(train_initial_checkpoint(dataset, spec, RECIPE, seed=seed))
        base_env = {
            **os.environ, "LETHE_DATABASE_URL": database_url, "LETHE_REDIS_URL": REDIS_URL,
            "LETHE_STORAGE_URL": str(tmp / "store"), "LETHE_DISPATCHER": "celery",
            "LETHE_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1", "LETHE_AUDIT_REFERENCES": str(REFERENCES),
            "LETHE_DATA_DIR": str(tmp),
            # Four models are registered from one checkpoint file: it must outlive the first registration.
            "LETHE_CONSUME_INPUTS": "false",
        }  # fmt: skip
        models = [f"mnist-cnn-{i}" for i in range(MODELS)]
        with (
            stack(base_env, tmp, "setup", workers=1) as setup,
            httpx.Client(base_url=setup.url, headers=setup.headers) as client,
        ):
            body = dataset_body(dataset, array_path, per_subject=PER_SUBJECT)
            dataset_id = client.post("/datasets", json=body, timeout=120).raise_for_status().json()["id"]
            for name in models:
                client.post("/models", json={
                    "name": name, "dataset_id": dataset_id, "spec": spec.to_dict(),
                    "checkpoint_path": str(checkpoint), "training_recipe": {"epochs": RECIPE.epochs},
                }).raise_for_status()  # fmt: skip
            built = time.monotonic()
            job = client.post(f"/models/{models[0]}/audit-references", json={"references": REFERENCES})
            job_id = job.raise_for_status().json()["id"]
            _wait_for(lambda: client.get(f"/jobs/{job_id}").json()["done"], "reference build", 1800)
            results["reference_build_s"] = round(time.monotonic() - built, 1)
        _share_references(database_url, models)
        # Each scenario its own block of subjects; another seed, another model and other subjects.
        count = len(dataset.train_rows) // PER_SUBJECT
        subjects = iter((seed * len(SCENARIOS) + i) * requests % count for i in range(len(SCENARIOS)))
        scenarios: dict[str, tuple[int, list[str], dict[str, float]]] = {
            "coalesced": (1, [models[0]], {}),
            "one_job_per_request": (1, [models[0]], {"batch_max_samples": 1, "batch_wait_s": 0}),
            "four_models_one_worker": (1, models, {}),
            "four_models_two_workers": (2, models, {}),
        }
        for name, (workers, targets, settings) in scenarios.items():
            first = next(subjects)
            if name not in only:
                continue
            with stack(base_env, tmp, name, workers, **settings) as running:
                results[name] = run_scenario(
                    running, targets, range(first, first + requests), over_s, timeout_s
                )
                results[name]["workers"] = workers
                results[name]["settings"] = settings or {  # the defaults
                    "batch_wait_s": 30.0,
                    "batch_max_samples": 10_000,
                }
            print(json.dumps({name: results[name]}, indent=2), flush=True)
    if set(only) == set(SCENARIOS):
        results["ratios"] = _ratios(results)
    results["setup"] = {
        "dataset": "mnist5k", "samples_per_subject": PER_SUBJECT, "requests_per_scenario": requests,
        "posted_over_s": over_s, "method": f"{DEFAULT_METHOD} (default)", "audit_references": REFERENCES,
        "initial_model": f"mnist_cnn, {RECIPE.epochs} epochs, seed {seed}",
        "worker": "celery --pool solo, 1 torch thread", "machine": machine(), "scenarios": list(only),
    }  # fmt: skip
    return results


def _ratios(results: dict[str, Any]) -> dict[str, Any]:
    coalesced, alone = results["coalesced"], results["one_job_per_request"]
    single_job_s = alone["job_running_s"]["median"]
    return {
        "single_request_job_s": single_job_s,
        # The last request is posted about a minute after the first: the bound is read from the last POST.
        "coalesced_after_last_post_over_5x_single_job_plus_wait": round(
            coalesced["last_completed_after_last_post_s"] / (5 * single_job_s + 30.0), 3
        ),
        "last_completed_one_job_per_request_over_coalesced": round(
            alone["last_completed_after_s"] / coalesced["last_completed_after_s"], 2
        ),
        "cpu_per_erased_sample_one_job_per_request_over_coalesced": round(
            alone["worker_cpu_s_per_erased_sample"] / coalesced["worker_cpu_s_per_erased_sample"], 1
        ),
        "four_models_one_worker_over_two_workers": round(
            results["four_models_one_worker"]["last_completed_after_s"]
            / results["four_models_two_workers"]["last_completed_after_s"],
            2,
        ),
    }


def _share_references(database_url: str, models: list[str]) -> None:
    """Register the first model's reference set for the others (see the module docstring)."""
    from service.models import repository as models_repository

    engine = make_engine(database_url)
    try:
        with make_session_factory(engine).begin() as session:
            first = models_repository.get_model_by_name(session, BENCH_TENANT, models[0])
            assert first is not None
            row = audit_service.current_set(session, first.id)
            assert row is not None, "the reference build did not register a set"
            stored = StoredObject(sha256=row.checkpoint_sha256, size=row.size, uri=row.storage_uri)
            for name in models[1:]:
                model = models_repository.get_model_by_name(session, BENCH_TENANT, name)
                assert model is not None
                audit_service.register_set(
                    session, model_id=model.id, dataset_id=row.dataset_id, job_id=str(row.job_id),
                    stored=stored, summary=row.summary,
                )  # fmt: skip
    finally:
        engine.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=100, help="requests per scenario (one subject each)")
    parser.add_argument("--over", type=float, default=60.0, help="seconds over which they are posted")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds a scenario may take")
    parser.add_argument("--json", type=Path, default=Path("results/bench-coalescing.json"))
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help=f"comma list of {', '.join(SCENARIOS)}"
    )
    parser.add_argument(
        "--seed", type=int, default=SEED, help="the initial model's training seed; also picks the subjects"
    )
    args = parser.parse_args(argv)
    only = tuple(args.scenarios.split(","))
    if unknown := set(only) - set(SCENARIOS):
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    result = run(args.requests, args.over, args.timeout, only, args.seed)
    write_result(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
