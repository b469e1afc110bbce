"""What the audit's reference set costs against one exact retrain, timed in one run on the same machine.

The calibration study times its references and its retrains minutes apart, on a machine other work shares;
this times them interleaved (retrain, reference, reference, retrain, ...) so that a change in the machine's
load falls on both. Each reference trains the model's recipe on half the train split and scores every train
and audit sample, as ``build_reference_set`` does; each retrain trains the recipe on the train split less one
50-sample subject, as exact unlearning does.

    python -m worker.bench.audit_cost --dataset mnist5k --json docs/results/audit-cost-mnist5k.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from worker.audit import LabelledRows, build_reference_set
from worker.bench.common import machine, write_result
from worker.datasets.builtin import DATASETS, load_dataset
from worker.engine.config import TrainingConfig
from worker.engine.context import RunContext
from worker.engine.data import TensorSplit
from worker.engine.models import build_model
from worker.engine.spec import mnist_cnn_spec
from worker.engine.training import train


def measure(dataset_name: str, references: int, retrains: int, seed: int) -> dict[str, Any]:
    data = load_dataset(dataset_name)
    spec = mnist_cnn_spec(data.num_classes, data.input_shape)
    recipe = TrainingConfig()
    x = torch.from_numpy(data.x)
    rng = np.random.default_rng(seed)
    train_split = LabelledRows(x[torch.from_numpy(data.train_rows)], data.y[data.train_rows], data.train_rows)
    audit_split = LabelledRows(
        x[torch.from_numpy(data.heldout_rows)], data.y[data.heldout_rows], data.heldout_rows
    )
    retrain_s: list[float] = []
    reference_s: list[float] = []
    pairs_per_retrain = max(1, references // 2 // retrains)
    for i in range(max(retrains, references // 2)):
        if len(retrain_s) < retrains:
            remaining = np.setdiff1d(data.train_rows, rng.choice(data.train_rows, 50, replace=False))
            index = torch.from_numpy(remaining)
            started = time.monotonic()
            torch.manual_seed(seed + i)
            train(build_model(spec), TensorSplit(x[index], torch.from_numpy(data.y[remaining])), recipe,
                  RunContext(seed=seed + i))  # fmt: skip
            retrain_s.append(time.monotonic() - started)
        for _ in range(pairs_per_retrain):
            if len(reference_s) < references:  # one complementary pair, as a set of 2 is built
                pair = build_reference_set(
                    spec, train_split, audit_split, recipe, k=2, seed=seed + 100 + len(reference_s)
                )
                reference_s.extend(pair.reference_seconds)
    mean_retrain = float(np.mean(retrain_s))
    return {
        "dataset": dataset_name,
        "recipe": recipe.__dict__,
        "retrain_seconds": [round(v, 2) for v in retrain_s],
        "reference_seconds": [round(v, 2) for v in reference_s],
        "per_reference_over_retrain": round(float(np.mean(reference_s)) / mean_retrain, 3),
        "k4_over_retrain": round(4 * float(np.mean(reference_s)) / mean_retrain, 2),
        "k16_over_retrain": round(16 * float(np.mean(reference_s)) / mean_retrain, 2),
        "threads": torch.get_num_threads(),
        "machine": machine(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dataset", default="mnist5k", choices=DATASETS)
    parser.add_argument("--references", type=int, default=4, help="references timed (whole pairs)")
    parser.add_argument("--retrains", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = measure(args.dataset, args.references, args.retrains, args.seed)
    write_result(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
