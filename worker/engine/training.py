"""Supervised training: the initial model, Retrain and Fine-tune all go through ``train``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from worker.engine.config import BatchNormMode, TrainingConfig
from worker.engine.context import RunContext
from worker.engine.data import TensorSplit


def batches(n: int, batch_size: int, generator: torch.Generator, shuffle: bool = True) -> list[torch.Tensor]:
    """Row indices for one pass over ``n`` rows, shuffled with ``generator``; the last batch may be short."""
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    return list(order.split(batch_size))


def set_batchnorm_mode(model: nn.Module, train: bool) -> None:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train(train)


# A batch's loss from the model's logits, the batch and its labels (on the runtime's device).
BatchLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(logits: torch.Tensor, _x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y)


def supervised_step(
    model: nn.Module,
    optimiser: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    x: torch.Tensor,
    y: torch.Tensor,
    ctx: RunContext,
    loss_of: BatchLoss = cross_entropy,
) -> torch.Tensor:
    """One step on a batch (mixed precision where the runtime has it), cross-entropy unless ``loss_of`` says
    otherwise; the batch's loss."""
    device = ctx.runtime.device
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    with ctx.runtime.autocast():
        loss = loss_of(model(x), x, y)
    optimiser.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimiser)
    scaler.update()
    return loss


def train(
    model: nn.Module,
    data: TensorSplit,
    config: TrainingConfig,
    ctx: RunContext,
    *,
    batchnorm: BatchNormMode = "train",
) -> nn.Module:
    """Adam + cross-entropy for ``config.epochs`` passes over ``data``; reports every step to ``ctx``.
    ``batchnorm="eval"`` freezes BatchNorm running statistics (Fine-tune with ``UnlearnConfig.batchnorm``)."""
    labels = data.require_labels()
    device = ctx.runtime.device
    model.to(device).train()
    set_batchnorm_mode(model, batchnorm == "train")
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scaler = ctx.runtime.grad_scaler()
    generator = ctx.generator()
    steps_per_epoch = -(-len(data) // config.batch_size)
    total = steps_per_epoch * config.epochs
    step = 0
    for epoch in range(1, config.epochs + 1):
        for rows in batches(len(data), config.batch_size, generator):
            loss = supervised_step(model, optimiser, scaler, data.x[rows], labels[rows], ctx)
            step += 1
            ctx.step(step, total, epoch, config.epochs, {"ce": float(loss.detach())})
    return model.eval()


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, ctx: RunContext, batch_size: int = 512) -> torch.Tensor:
    """Logits for ``x`` in eval mode (test-time behaviour), returned on the CPU as float32.

    Always in full float32, never under autocast: these logits are the evidence (the audit's per-sample
    scores, the reference set's, the reports' accuracies), and evidence must not move with the device or its
    precision. Mixed precision is for training, where it pays."""
    was_training = model.training
    model.eval()
    outputs = []
    for chunk in x.split(batch_size):
        outputs.append(model(chunk.to(ctx.runtime.device)).float().cpu())
    model.train(was_training)
    return torch.cat(outputs) if outputs else torch.empty(0)
