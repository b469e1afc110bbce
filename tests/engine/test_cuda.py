"""The CUDA path: a GPU worker trains under bf16 autocast, every method runs there, its checkpoints load on a
CPU, and the evidence (the audit's per-sample scores) is the CPU's to float32 rounding. Skipped where no GPU
is visible (CI has none); run on a GPU worker with ``python -m pytest tests/engine/test_cuda.py``."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from tests.engine.test_baselines import SMALL, SPEC, Digits
from worker.audit.scores import membership_scores
from worker.checkpoints import load_state_dict, state_dict_to_bytes
from worker.engine.api import unlearn
from worker.engine.config import METHODS, TrainingConfig, make_config
from worker.engine.context import RunContext
from worker.engine.models import build_model
from worker.engine.runtime import CPU, Runtime
from worker.engine.training import train
from worker.evaluation import accuracy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (CI has none)")


@pytest.fixture(scope="module")
def cuda() -> Runtime:
    return Runtime.detect()


@pytest.fixture(scope="module")
def digits() -> Digits:
    return Digits()


def test_a_gpu_worker_trains_in_bf16_and_keeps_float32_exact(cuda: Runtime) -> None:
    assert cuda.device.type == "cuda" and cuda.mixed_precision
    assert cuda.amp_dtype == torch.bfloat16  # every GPU a worker is sold for has it; bf16 needs no scaler
    assert not cuda.grad_scaler().is_enabled()
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    described = cuda.describe()
    assert described["device"] == "cuda" and described["mixed_precision"] is True
    assert described["device_name"] == torch.cuda.get_device_name()


def test_training_steps_run_under_autocast(cuda: Runtime, digits: Digits) -> None:
    dtypes: set[torch.dtype] = set()
    torch.manual_seed(0)
    model = build_model(SPEC)
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    first_conv.register_forward_hook(lambda _m, _i, out: dtypes.add(out.dtype))
    train(model, digits.train, TrainingConfig(epochs=1, lr=3e-3, batch_size=64), RunContext(runtime=cuda))
    assert dtypes == {torch.bfloat16}
    assert all(p.dtype == torch.float32 and p.device.type == "cuda" for p in model.parameters())


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_runs_on_cuda_and_its_checkpoint_loads_on_a_cpu(
    cuda: Runtime, digits: Digits, method: str
) -> None:
    forget, retain = digits.forget, digits.retain
    overrides: dict[str, object] = {**SMALL, "seed": 0}
    if METHODS[method].steered:  # any targets will do here: below the base model's scores
        base = membership_scores(digits.model, forget.x, forget.require_labels().numpy(), CPU)
        forget = dataclasses.replace(forget, targets=torch.from_numpy(base - 2.0))
        overrides["max_class_share"] = 1.0  # the forget set is a whole class: keep the matching loop
    config = make_config(method, overrides)
    on_gpu = unlearn(digits.model, SPEC, forget, retain, config, runtime=cuda)
    assert next(on_gpu.parameters()).device.type == "cuda"
    restored = load_state_dict(state_dict_to_bytes(on_gpu), SPEC)
    assert all(torch.isfinite(p).all() and p.device.type == "cpu" for p in restored.parameters())
    on_cpu = unlearn(digits.model, SPEC, forget, retain, config, runtime=CPU)
    ctx = RunContext()
    # Same method, same seed, another device and precision: close, not equal (bf16, other kernels).
    assert abs(accuracy(restored, digits.test, ctx) - accuracy(on_cpu, digits.test, ctx)) < 5.0


def test_evidence_scores_are_the_cpus_to_float32_rounding(cuda: Runtime, digits: Digits) -> None:
    x, labels = digits.train.x, digits.train.require_labels().numpy()
    on_cpu = membership_scores(digits.model, x, labels, CPU)
    on_gpu_model = load_state_dict(state_dict_to_bytes(digits.model), SPEC).to(cuda.device)
    on_gpu = membership_scores(on_gpu_model, x, labels, cuda)
    # bf16 logits would be off by up to about 0.1 here (benchmarks: worker.bench.cuda_check); float32 is exact
    # to its rounding, far inside any reference model's spread.
    assert np.abs(on_cpu - on_gpu).max() < 1e-3
