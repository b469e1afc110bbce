"""Fine-tune: gradient descent on D_r only, relying on catastrophic forgetting of D_f."""

from __future__ import annotations

from torch import nn

from worker.engine.config import FinetuneConfig, TrainingConfig
from worker.engine.context import RunContext
from worker.engine.data import TensorSplit
from worker.engine.spec import ModelSpec
from worker.engine.training import train


def run(
    model: nn.Module,
    spec: ModelSpec,
    forget: TensorSplit,
    retain: TensorSplit,
    config: FinetuneConfig,
    ctx: RunContext,
) -> nn.Module:
    forget.require_labels()
    training = TrainingConfig(epochs=config.epochs, lr=config.lr, batch_size=config.batch_size)
    return train(model, retain, training, ctx, batchnorm=config.batchnorm)
