"""The paired forget/retain batch loop shared by NegGrad, RandLabel, randlabel-mixup and UGradSL(+), and their
helpers.

One epoch is one pass over the looped set (D_f for the forget-looped methods, so their cost scales with the
forget set; D_r for UGradSL+). Each looped batch is paired with an equally sized batch of the other set, drawn
as consecutive slices of reshuffled passes over it: no sample repeats before all have been drawn, and a set
smaller than an epoch is simply revisited (UGradSL+ samples D_f "with replacement" in this sense).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

import numpy as np
import torch
from torch import nn

from worker.engine.config import UnlearnConfig
from worker.engine.context import RunContext
from worker.engine.data import TensorSplit
from worker.engine.training import batches, set_batchnorm_mode

ConfigT = TypeVar("ConfigT", bound=UnlearnConfig)


def config_as(config: UnlearnConfig, kind: type[ConfigT], method: str) -> ConfigT:
    """``config`` as the configuration type ``method`` runs on (the engine dispatches by type)."""
    if not isinstance(config, kind):
        raise TypeError(f"{method} needs a {kind.__name__}, got {type(config).__name__}")
    return config


def require_remaining(retain: TensorSplit, method: str) -> None:
    if len(retain) == 0:
        raise ValueError(f"{method} needs a non-empty remaining set")


def steps_over_retain(n_retain: int, epochs: int, batch_size: int, min_steps: int) -> int:
    """Optimiser steps of a D_r-driven method (repair, calibrated): ``epochs`` passes over ``n_retain`` rows,
    at least ``min_steps``."""
    return max(min_steps, math.ceil(epochs * n_retain / batch_size), 1)


def cosine_after_two(optimiser: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The first two steps at the optimiser's lr, then a cosine decay that reaches 0 at the last step (so a
    short run does not end on a noisy step)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: 0.5 * (1 + math.cos(math.pi * max(0, step - 1) / max(1, steps - 1)))
    )


# RunContext.generator offsets: independent streams of the run's seed; methods use METHOD_STREAM and up.
_ORDER_STREAM, _PAIR_STREAM = 0, 1
METHOD_STREAM = 2


@dataclass(frozen=True)
class PairedBatch:
    """A forget batch and a retain batch of the same size, on the run's device; ``rows_*`` index the splits
    (on the CPU) for per-sample data the method holds, such as labels or fixed random targets."""

    x_f: torch.Tensor
    x_r: torch.Tensor
    rows_f: torch.Tensor
    rows_r: torch.Tensor


# Returns the loss to minimise and the named values to report (detached by the loop).
BatchLoss = Callable[[PairedBatch], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class Cycler:
    """Batches of a set drawn from consecutive reshuffled passes over it: no row repeats before all have been
    drawn."""

    def __init__(self, n: int, generator: torch.Generator) -> None:
        self.n = n
        self.generator = generator
        self.pending = torch.empty(0, dtype=torch.long)

    def take(self, size: int) -> torch.Tensor:
        while len(self.pending) < size:
            self.pending = torch.cat([self.pending, torch.randperm(self.n, generator=self.generator)])
        rows, self.pending = self.pending[:size], self.pending[size:]
        return rows


def unlearning_mode(model: nn.Module, config: UnlearnConfig) -> None:
    """Training mode, with BatchNorm running statistics frozen unless ``config.batchnorm == "train"`` (the LAF
    lineage's default: the forget/retain batches are small and skewed)."""
    model.train()
    set_batchnorm_mode(model, config.batchnorm == "train")


def run_paired(
    model: nn.Module,
    forget: TensorSplit,
    retain: TensorSplit,
    config: UnlearnConfig,
    ctx: RunContext,
    loss_fn: BatchLoss,
    loop_over: Literal["forget", "retain"] = "forget",
) -> nn.Module:
    """Adam on ``loss_fn`` for ``config.epochs`` passes over the ``loop_over`` set, under the runtime's
    autocast and grad scaler; every optimiser step is reported to (and may be cancelled by) ``ctx``."""
    if len(retain) == 0:
        raise ValueError("this method needs a non-empty remaining set")
    device = ctx.runtime.device
    model.to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr)
    scaler = ctx.runtime.grad_scaler()
    looped, other = (forget, retain) if loop_over == "forget" else (retain, forget)
    order = ctx.generator(_ORDER_STREAM)
    partner = Cycler(len(other), ctx.generator(_PAIR_STREAM))
    total = -(-len(looped) // config.batch_size) * config.epochs
    step = 0
    unlearning_mode(model, config)
    for epoch in range(1, config.epochs + 1):
        for rows in batches(len(looped), config.batch_size, order):
            if loop_over == "forget":
                rows_f, rows_r = rows, partner.take(len(rows))
            else:
                rows_f, rows_r = partner.take(len(rows)), rows
            batch = PairedBatch(
                forget.x[rows_f].to(device, non_blocking=True),
                retain.x[rows_r].to(device, non_blocking=True),
                rows_f,
                rows_r,
            )
            with ctx.runtime.autocast():
                loss, values = loss_fn(batch)
            optimiser.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimiser)
            scaler.update()
            step += 1
            ctx.step(step, total, epoch, config.epochs, {k: float(v.detach()) for k, v in values.items()})
    return model


def numpy_stream(generator: torch.Generator) -> np.random.Generator:
    """A numpy generator seeded from ``generator`` (torch has no seeded Beta sampler)."""
    return np.random.default_rng(int(torch.randint(2**62, (1,), generator=generator)))


def frozen_copy(model: nn.Module) -> nn.Module:
    """The initial model as a fixed reference (test-time mode, no gradients), taken before any update."""
    return copy.deepcopy(model).eval().requires_grad_(False)


def random_onehot(n: int, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """One fixed random label per sample, one-hot (n, K), drawn without reading any true label."""
    labels = torch.randint(num_classes, (n,), generator=generator)
    return nn.functional.one_hot(labels, num_classes).float()


def prob_mse(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error between softmax(logits) and a target distribution, summed over classes, batch mean."""
    return (torch.softmax(logits.float(), dim=1) - target).pow(2).sum(dim=1).mean()
