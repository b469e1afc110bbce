"""Damage then repair: re-initialise the last layers, then fine-tune on D_r (RepairConfig has the defaults and
why).

The approach of the NeurIPS 2023 unlearning challenge's leading entries (re-initialise or perturb part of the
network, then fine-tune on the retain set): the forgotten samples' influence leaves with the re-initialised
layers, and since D_f is never trained on again, it is not relearnt. Randomness is part of the method, as it
is of exact retraining: the fresh layers are a new draw of the architecture's initialisation (from the run's
seed), and the repair visits D_r in a seeded random order.

Optionally MixUnlearn runs first as a forget step (``mixunlearn_steps``), on the model handed in; the damage
and the repair then apply to its output.

Only ``model``, ``forget`` and ``retain`` are read: no audit evidence (reference scores, never-seen controls).
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from worker.engine.config import MixUnlearnConfig, RepairConfig, UnlearnConfig
from worker.engine.context import RunContext
from worker.engine.data import TensorSplit
from worker.engine.methods import mixunlearn
from worker.engine.methods._loops import (
    Cycler,
    config_as,
    cosine_after_two,
    require_remaining,
    steps_over_retain,
    unlearning_mode,
)
from worker.engine.models import build_model
from worker.engine.progress import ProgressEvent
from worker.engine.spec import ModelSpec
from worker.engine.training import BatchLoss, cross_entropy, supervised_step

# Independent random streams of the run's seed (RunContext.generator offsets).
_FRESH_STREAM, _ORDER_STREAM, _FORGET_STEP_STREAM = 0, 1, 2


def weighted_layers(model: nn.Module) -> list[nn.Module]:
    """The model's convolutions and linear layers, in registration order (forward order for the built-in
    architectures)."""
    return [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def fresh_model(spec: ModelSpec, generator: torch.Generator) -> nn.Module:
    """A new draw of the architecture's initialisation, seeded from ``generator``, without touching the
    caller's global RNG state."""
    seed = int(torch.randint(2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(spec)


@torch.no_grad()
def reinitialise_last(model: nn.Module, fresh: nn.Module, count: int) -> None:
    """Copy the last ``count`` weighted layers' parameters of ``fresh`` into ``model`` (same architecture)."""
    layers, fresh_layers = weighted_layers(model), weighted_layers(fresh)
    if count > len(layers):
        raise ValueError(f"reinit_layers={count}, but the model has only {len(layers)} weighted layers")
    for layer, new in zip(layers[len(layers) - count :], fresh_layers[len(layers) - count :], strict=True):
        for name, param in layer.named_parameters(recurse=False):
            param.copy_(getattr(new, name))


def _forget_step_steps(n_forget: int, config: RepairConfig) -> int:
    """MixUnlearn's own step count for ``mixunlearn_steps`` (whole passes over D_f, as it runs them)."""
    if config.mixunlearn_steps == 0:
        return 0
    per_epoch = -(-n_forget // config.batch_size)
    return per_epoch * -(-config.mixunlearn_steps // per_epoch)


def _frozen_copy(model: nn.Module) -> nn.Module:
    teacher = copy.deepcopy(model).eval()
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher


def _distilled_loss(teacher: nn.Module, distill: float) -> BatchLoss:
    """(1 - distill) cross-entropy + distill KL(base || repaired) on a D_r batch: the repaired model is held
    to what the base model said of the data it keeps (its confidence on its own training samples included),
    and never sees D_f."""

    def loss_of(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = F.log_softmax(teacher(x).float(), dim=1)
        kl = F.kl_div(F.log_softmax(logits.float(), dim=1), target, reduction="batchmean", log_target=True)
        return (1 - distill) * F.cross_entropy(logits, y) + distill * kl

    return loss_of


def run(
    model: nn.Module,
    spec: ModelSpec,
    forget: TensorSplit,
    retain: TensorSplit,
    config: UnlearnConfig,
    ctx: RunContext,
) -> nn.Module:
    config = config_as(config, RepairConfig, "repair")
    require_remaining(retain, "repair")
    forget.require_labels()  # label-aware (config.METHODS): refuse unlabelled requests like Retrain
    labels = retain.require_labels()
    device = ctx.runtime.device
    steps = steps_over_retain(len(retain), config.epochs, config.batch_size, config.min_steps)
    before = _forget_step_steps(len(forget), config)
    total = before + steps

    if before:
        # MixUnlearn as the forget step: its own seed stream; its progress counts towards the whole run's.
        def forward(event: ProgressEvent) -> None:
            if ctx.progress is not None:
                ctx.progress(dataclasses.replace(event, total_steps=total))

        seed = int(torch.randint(2**62, (1,), generator=ctx.generator(_FORGET_STEP_STREAM)))
        step_ctx = dataclasses.replace(ctx, progress=forward, seed=seed)
        mix = MixUnlearnConfig(
            epochs=1, min_steps=config.mixunlearn_steps, batch_size=config.batch_size, seed=seed
        )
        model = mixunlearn.run(model, spec, forget, retain, mix, step_ctx)

    model.to(device)
    loss_of = _distilled_loss(_frozen_copy(model), config.distill) if config.distill > 0 else cross_entropy
    reinitialise_last(model, fresh_model(spec, ctx.generator(_FRESH_STREAM)).to(device), config.reinit_layers)

    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr)
    scheduler = cosine_after_two(optimiser, steps)
    scaler = ctx.runtime.grad_scaler()
    order = Cycler(len(retain), ctx.generator(_ORDER_STREAM))
    epochs = math.ceil(steps * config.batch_size / len(retain))
    unlearning_mode(model, config)
    for step in range(1, steps + 1):
        rows = order.take(config.batch_size)
        loss = supervised_step(model, optimiser, scaler, retain.x[rows], labels[rows], ctx, loss_of)
        scheduler.step()
        epoch = min(epochs, 1 + (step - 1) * config.batch_size // len(retain))
        ctx.step(before + step, total, epoch, epochs, {"ce": float(loss.detach())})
    return model
