"""Retrain (exact unlearning, the gold standard): a fresh model trained from scratch on D_r (paper A.3)."""

from __future__ import annotations

import torch
from torch import nn

from worker.engine.config import RetrainConfig, TrainingConfig
from worker.engine.context import RunContext
from worker.engine.data import TensorSplit
from worker.engine.models import build_model
from worker.engine.spec import ModelSpec
from worker.engine.training import train


def run(
    model: nn.Module,
    spec: ModelSpec,
    forget: TensorSplit,
    retain: TensorSplit,
    config: RetrainConfig,
    ctx: RunContext,
) -> nn.Module:
    """Ignores ``model``'s weights and ``forget``'s samples; only the architecture (``spec``) carries over."""
    forget.require_labels()  # label-aware (config.METHODS): refuse unlabelled requests like the others
    # Deterministic initialisation under config.seed without touching the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        fresh = build_model(spec)
    training = TrainingConfig(epochs=config.epochs, lr=config.lr, batch_size=config.batch_size)
    return train(fresh, retain, training, ctx, batchnorm=config.batchnorm)
