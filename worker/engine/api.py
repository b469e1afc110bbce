"""The engine's one entry point: ``unlearn``. Every method, exact or approximate, sits behind it."""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable
from typing import Any

from torch import nn

from worker.engine.config import (
    CalibratedConfig,
    FinetuneConfig,
    MixUnlearnConfig,
    NegGradConfig,
    RandLabelConfig,
    RandLabelMixupConfig,
    RepairConfig,
    RetrainConfig,
    UGradSLConfig,
    UnlearnConfig,
)
from worker.engine.context import RunContext
from worker.engine.data import TensorSplit
from worker.engine.progress import CancellationToken, ProgressCallback
from worker.engine.runtime import CPU, Runtime
from worker.engine.spec import ModelSpec

MethodRun = Callable[[nn.Module, ModelSpec, TensorSplit, TensorSplit, UnlearnConfig, RunContext], nn.Module]

# Config type -> module in worker.engine.methods whose ``run`` implements it. ugradsl / ugradsl-plus and the
# two MixUnlearn modes share a config type and differ by a field of it.
_IMPLEMENTATIONS: dict[type[UnlearnConfig], str] = {
    RetrainConfig: "retrain",
    FinetuneConfig: "finetune",
    NegGradConfig: "neggrad",
    RandLabelConfig: "randlabel",
    RandLabelMixupConfig: "randlabel_mixup",
    UGradSLConfig: "ugradsl",
    MixUnlearnConfig: "mixunlearn",
    RepairConfig: "repair",
    CalibratedConfig: "calibrated",
}


def unlearn(
    model: nn.Module,
    spec: ModelSpec,
    forget: TensorSplit,
    retain: TensorSplit,
    config: UnlearnConfig,
    progress: ProgressCallback | None = None,
    cancel: CancellationToken | None = None,
    runtime: Runtime = CPU,
) -> nn.Module:
    """Return a new model with ``forget``'s influence removed; ``model`` itself is never modified.

    Deterministic under ``config.seed`` on CPU. Raises ``UnlearningCancelled`` when ``cancel`` is set.
    """
    if len(forget) == 0:
        raise ValueError("the forget set is empty")
    module_name = _IMPLEMENTATIONS.get(type(config))
    if module_name is None:
        raise TypeError(f"no engine method for config type {type(config).__name__}")
    run: MethodRun = importlib.import_module(f"worker.engine.methods.{module_name}").run
    ctx = RunContext(runtime=runtime, progress=progress, cancel=cancel, seed=config.seed)
    working_copy = copy.deepcopy(model).to(runtime.device)
    result = run(working_copy, spec, forget, retain, config, ctx)
    return result.eval()


def treatment(forget: TensorSplit, retain: TensorSplit, config: UnlearnConfig) -> dict[str, Any] | None:
    """How a method that routes by the forget set's shape (``calibrated``) will treat these sets, for the
    job's record; None for the methods that always do one thing."""
    if isinstance(config, CalibratedConfig):
        from worker.engine.methods import calibrated

        return calibrated.treatment(forget, retain, config)
    return None
