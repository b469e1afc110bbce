"""Memory benchmark: the API's peak RSS while a checkpoint is uploaded, and a worker's while it opens a cached
dataset, for a small and a large object (``python -m worker.bench.memory``).

The API runs under uvicorn in a subprocess on a fresh Postgres database; its peak RSS is the kernel's high
water mark (``VmHWM`` in ``/proc/PID/status``), read after a warm-up request and after each upload
(``POST /models/upload``, multipart). The worker side runs in a subprocess too: the store's file of a dataset
array, memory-mapped as a job opens it, and the rows of a 50-sample request read from it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from safetensors.numpy import save_file

from worker.bench.common import (
    bench_backends,
    bench_headers,
    free_port,
    machine,
    new_bucket_url,
    s3_server,
    wait_until_up,
    write_result,
)

REDIS_URL = os.environ.get("LETHE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/15")
SIZES_MB = (10, 200)


def peak_rss_mb(pid: int) -> float:
    return memory_mb(pid)["peak_rss"]


def _checkpoint(path: Path, megabytes: int) -> Path:
    """A safetensors file of about ``megabytes`` MB (one float32 tensor; the API never reads its values)."""
    save_file({"fc.weight": np.zeros((megabytes * 1024 * 256, 1), dtype=np.float32)}, str(path))
    return path


def api_upload(tmp: Path, store: str, storage_url: str) -> list[dict[str, Any]]:
    rows = []
    with bench_backends(f"lethe_bench_memory_{store}", REDIS_URL) as database_url:
        port = free_port()
        env = {**os.environ, "LETHE_DATABASE_URL": database_url, "LETHE_REDIS_URL": REDIS_URL,
               "LETHE_STORAGE_URL": storage_url, "LETHE_DATA_DIR": str(tmp), "LETHE_RATE_LIMIT": "",
               "LETHE_LOG_LEVEL": "WARNING"}  # fmt: skip
        server = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "service.app:create_served_app",
             "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", "--no-access-log"],
            env=env,
        )  # fmt: skip
        try:
            headers = bench_headers(database_url)
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=600) as client:
                wait_until_up(client)
                array = tmp / "x.npz"
                np.savez(array, x=np.zeros((10, 1, 1, 1), dtype=np.float32))
                samples = [{"sample_id": f"s{i}", "row": i, "split": "train"} for i in range(10)]
                body = {"name": "d", "array_path": str(array), "samples": samples}
                dataset = client.post("/datasets", json=body).raise_for_status().json()
                spec = {"architecture": "mnist_cnn", "num_classes": 10, "input_shape": [1, 1, 1],
                        "feature_layer": "features.block2"}  # fmt: skip
                for megabytes in SIZES_MB:
                    path = _checkpoint(tmp / f"c{megabytes}.safetensors", megabytes)
                    before = peak_rss_mb(server.pid)
                    started = time.perf_counter()
                    with path.open("rb") as handle:
                        answer = client.post(
                            "/models/upload",
                            data={
                                "name": f"m{megabytes}",
                                "dataset_id": dataset["id"],
                                "spec": json.dumps(spec),
                            },
                            files={"checkpoint": (path.name, handle)},
                        )
                    seconds = time.perf_counter() - started
                    # The API checks the safetensors header, not the tensors against the spec (workers do).
                    after = peak_rss_mb(server.pid)
                    rows.append({
                        "object": "checkpoint upload (POST /models/upload)",
                        "store": store, "size_mb": round(path.stat().st_size / 2**20, 1),
                        "status": answer.status_code, "seconds": round(seconds, 2),
                        "peak_rss_before_mb": before, "peak_rss_after_mb": after,
                        "peak_rss_increase_mb": round(after - before, 1),
                    })  # fmt: skip
        finally:
            server.terminate()
            server.wait(timeout=30)
    return rows


_WORKER_PROBE = textwrap.dedent(
    """
    import json
    import os
    import sys
    from pathlib import Path
    import numpy as np
    from worker.bench.memory import memory_mb
    from worker.pipeline import open_rows
    path = Path(sys.argv[1])
    before = memory_mb(os.getpid())
    x = open_rows(path)
    opened = memory_mb(os.getpid())
    rows = np.sort(np.random.default_rng(0).choice(len(x), size=50, replace=False))
    forget = np.asarray(x[rows])
    read = memory_mb(os.getpid())
    whole = np.load(path)["x"]  # what a loader without the memory map would hold
    loaded = memory_mb(os.getpid())
    print(json.dumps({"before": before, "opened": opened, "rows_read": read, "np_load": loaded}))
    """
)


def memory_mb(pid: int) -> dict[str, float]:
    """Peak RSS (VmHWM), and the RSS's anonymous (private) and file-backed parts, in MB."""
    fields = {"VmHWM": "peak_rss", "RssAnon": "anonymous", "RssFile": "file_backed"}
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in fields:
            found[fields[key]] = round(int(line.split()[1]) / 1024, 1)
    return found


def worker_open(tmp: Path) -> list[dict[str, Any]]:
    """The array file as a worker's cache holds it after its first fetch (a local store's object file is the
    same bytes), opened by a fresh process as a job opens it."""
    from service.storage import LocalStore

    store = LocalStore(tmp / "worker-store")
    rows = []
    for megabytes in SIZES_MB:
        count = megabytes * 2**20 // (28 * 28 * 4)
        array = tmp / f"a{megabytes}.npz"
        np.savez(array, x=np.zeros((count, 1, 28, 28), dtype=np.float32))
        with array.open("rb") as handle:
            stored = store.put_stream(handle)
        cached = store.local_path(stored.uri)
        probe = [sys.executable, "-c", _WORKER_PROBE, str(cached)]
        seen = json.loads(subprocess.run(probe, capture_output=True, text=True, check=True).stdout)

        def increase(stage: str, part: str, seen: dict[str, Any] = seen) -> float:
            return round(seen[stage][part] - seen["before"][part], 1)

        rows.append({
            "object": "dataset array in the cache", "size_mb": round(cached.stat().st_size / 2**20, 1),
            "open_peak_rss_increase_mb": increase("opened", "peak_rss"),
            "read_50_rows_peak_rss_increase_mb": increase("rows_read", "peak_rss"),
            "read_50_rows_anonymous_increase_mb": increase("rows_read", "anonymous"),
            "read_50_rows_file_backed_increase_mb": increase("rows_read", "file_backed"),
            "np_load_whole_anonymous_increase_mb": increase("np_load", "anonymous"),
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", type=Path, default=Path("results/bench-memory.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lethe-bench-memory-") as directory, s3_server(Path(directory)):
        tmp = Path(directory)
        api = api_upload(tmp, "local", str(tmp / "store")) + api_upload(tmp, "s3", new_bucket_url())
        result = {"benchmark": "memory", "api": api, "worker": worker_open(tmp), "machine": machine()}
    write_result(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
