"""The CUDA path measured on a GPU worker: training speed against the same machine's CPUs, and how far bf16
logits would move the audit's per-sample scores (which is why evidence is scored in float32).

    python -m worker.bench.cuda_check --json results/cuda-check.json

On mnist5k with the paper's initial-model recipe (batch 32): seconds per epoch of training under the
detected runtime (CUDA, bf16 autocast) and on the CPUs (float32, every core), each timed after one
warm-up epoch; then a full initial model on CUDA, whose phi scores on all 5,000 images are computed three
ways: CPU float32, CUDA float32 (what ``predict_logits`` does) and CUDA under bf16 autocast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from worker.audit.scores import membership_scores
from worker.bench.methods import INITIAL_TRAINING
from worker.datasets import load_dataset
from worker.engine.context import RunContext
from worker.engine.data import TensorSplit
from worker.engine.models import build_model
from worker.engine.runtime import CPU, Runtime
from worker.engine.scores import stable_logit
from worker.engine.spec import mnist_cnn_spec
from worker.engine.training import train

SPEC = mnist_cnn_spec(10, (1, 28, 28))


def _seconds_per_epoch(runtime: Runtime, data: TensorSplit, epochs: int) -> float:
    torch.manual_seed(0)
    model = build_model(SPEC)
    warm_up = dataclasses.replace(INITIAL_TRAINING, epochs=1)
    train(model, data, warm_up, RunContext(runtime=runtime))  # kernels, allocator, autotuning
    timed = dataclasses.replace(INITIAL_TRAINING, epochs=epochs)
    if runtime.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    train(model, data, timed, RunContext(runtime=runtime))
    if runtime.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / epochs


def _differences(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    gap = np.abs(a - b)
    return {"max": float(gap.max()), "p99": float(np.quantile(gap, 0.99)), "median": float(np.median(gap))}


def run(epochs: int) -> dict[str, Any]:
    runtime = Runtime.detect()
    if runtime.device.type != "cuda":
        raise SystemExit("no CUDA device: this check runs on a GPU worker")
    data = load_dataset("mnist5k")
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    rows = torch.from_numpy(data.train_rows)
    train_split = TensorSplit(x[rows], y[rows])
    torch.set_num_threads(os.cpu_count() or 1)
    timing = {
        "cuda_s_per_epoch": _seconds_per_epoch(runtime, train_split, epochs),
        "cpu_s_per_epoch": _seconds_per_epoch(CPU, train_split, epochs),
        "cpu_threads": torch.get_num_threads(),
        "epochs_timed": epochs,
    }
    timing["cpu_over_cuda"] = timing["cpu_s_per_epoch"] / timing["cuda_s_per_epoch"]

    torch.manual_seed(0)
    model = build_model(SPEC)
    train(model, train_split, INITIAL_TRAINING, RunContext(runtime=runtime))
    labels = data.y
    cuda_fp32 = membership_scores(model, x, labels, runtime)
    cpu_fp32 = membership_scores(model.to("cpu"), x, labels, CPU)
    model.to(runtime.device)
    with torch.no_grad(), runtime.autocast():
        bf16_logits = torch.cat([model(chunk.to(runtime.device)).float().cpu() for chunk in x.split(512)])
    cuda_bf16 = stable_logit(bf16_logits, y).numpy()
    return {
        "runtime": runtime.describe(),
        "training": timing,
        "scores": {
            "samples": len(labels),
            "phi_sd_across_samples": float(cpu_fp32.std()),
            "cuda_float32_vs_cpu": _differences(cuda_fp32, cpu_fp32),
            "cuda_bf16_autocast_vs_cpu": _differences(cuda_bf16, cpu_fp32),
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per device (default: 2)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    results = run(args.epochs)
    text = json.dumps(results, indent=1)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
