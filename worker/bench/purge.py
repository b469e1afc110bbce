"""What purging a dataset array costs: a new generation written without the erased rows, stored by content.

    python -m worker.bench.purge --gib 1 --rows 50 --json docs/results/bench-purge.json

For each case (array size, erased rows) a fresh process builds an uncompressed ``.npz`` of float32 rows
(1 x 128 x 128, 64 KiB each) in a temporary directory, then times ``rewrite_array`` (the purge stage's
streamed rewrite) and ``LocalStore.put_stream`` (hash, then copy into the store) and samples its anonymous
resident memory (``RssAnon``, every 5 ms): the heap the purge allocates, not the file pages the kernel
caches for the memory map, which it may drop at any time. Cases: the 1 GiB array with 50 and 5,000 rows, and
a quarter of it with 50, so the scaling with the array's size and with the number of rows shows in one run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROW_SHAPE = (1, 128, 128)  # float32: 64 KiB a row


def _rss_anon_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0


class _PeakSampler:
    def __init__(self) -> None:
        self.peak, self._stop = _rss_anon_kib(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_anon_kib())

    def __enter__(self) -> _PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _write_array(path: Path, num_rows: int) -> None:
    """An uncompressed npz of ``num_rows`` random rows, written in blocks (never whole in memory)."""
    import zipfile

    from numpy.lib import format as npy_format

    rng = np.random.default_rng(0)
    header = {"descr": "<f4", "fortran_order": False, "shape": (num_rows, *ROW_SHAPE)}
    with (
        zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive,
        archive.open("x.npy", "w", force_zip64=True) as member,
    ):
        npy_format.write_array_header_2_0(member, header)
        for start in range(0, num_rows, 1024):
            block = rng.standard_normal((min(1024, num_rows - start), *ROW_SHAPE), dtype=np.float32)
            member.write(block.data)


def _case(num_rows: int, erased: int, queue: Any) -> None:
    from service.storage import LocalStore
    from worker.pipeline.data import open_rows
    from worker.pipeline.purge import rewrite_array

    with tempfile.TemporaryDirectory(dir=".") as directory:
        root = Path(directory)
        source = root / "array.npz"
        _write_array(source, num_rows)
        rows = np.sort(np.random.default_rng(1).choice(num_rows, erased, replace=False))
        store = LocalStore(root / "store")
        baseline = _rss_anon_kib()
        with _PeakSampler() as sampler, (root / "generation.npz").open("w+b") as out:
            started = time.perf_counter()
            rewrite_array(source, rows, out)
            rewritten = time.perf_counter()
            stored = store.put_stream(out)
            finished = time.perf_counter()
        new = open_rows(store.local_path(stored.uri))
        kept = int(np.setdiff1d(np.arange(num_rows), rows)[0])
        assert not new[rows].any() and np.array_equal(new[kept], open_rows(source)[kept])
        queue.put({
            "array_bytes": source.stat().st_size, "rows": num_rows, "erased_rows": erased,
            "rewrite_seconds": round(rewritten - started, 3), "store_seconds": round(finished - rewritten, 3),
            "total_seconds": round(finished - started, 3),
            "rewrite_mib_per_s": round(source.stat().st_size / 2**20 / (rewritten - started), 1),
            "peak_anon_rss_delta_mib": round((sampler.peak - baseline) / 1024, 1),
        })  # fmt: skip


def run(gib: float, erased: int) -> list[dict[str, Any]]:
    full = int(gib * 2**30 // (4 * np.prod(ROW_SHAPE)))
    cases = [(full, erased), (full, erased * 100), (full // 4, erased)]
    results = []
    context = multiprocessing.get_context("spawn")  # a clean process per case: its own peak
    for num_rows, rows in cases:
        queue = context.Queue()
        process = context.Process(target=_case, args=(num_rows, rows, queue))
        process.start()
        results.append(queue.get())
        process.join()
        print(json.dumps(results[-1]))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--rows", type=int, default=50)
    parser.add_argument("--json", type=Path, default=Path("results/bench-purge.json"))
    args = parser.parse_args()
    results = run(args.gib, args.rows)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"cases": results, "row_shape": list(ROW_SHAPE)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
