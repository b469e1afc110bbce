"""Calibrated forgetting: fine-tune on D_r while each forgotten sample's score is pulled down to what models
that never trained on it give, and held there (CalibratedConfig has the defaults and why).

Aim at what retraining would output, not at maximum forgetting (issue 20; oracle matching, ICLR 2025): a
forgotten sample the model handed in scores above its target (a memorised one far above) is matched to it,
from both sides, so it is neither left member-like nor pushed past it; one that already scores at or below
its target is left alone. The targets (``forget.targets``) are the steering references' median OUT scores,
computed by the caller; the audit judges with other references.

Reads ``model``, ``forget`` (with its targets) and ``retain``; nothing else of the audit's evidence.

Routed by the forget set's shape: where it holds more than ``max_class_share`` of one class, per-sample
targets no longer describe a model trained without it, and ``repair``'s treatment runs instead.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from worker.engine.config import CalibratedConfig, RepairConfig, TrainingConfig, UnlearnConfig
from worker.engine.context import RunContext
from worker.engine.data import TensorSplit
from worker.engine.methods import repair
from worker.engine.methods._loops import (
    Cycler,
    config_as,
    cosine_after_two,
    require_remaining,
    steps_over_retain,
    unlearning_mode,
)
from worker.engine.scores import stable_logit
from worker.engine.spec import ModelSpec

# Independent random streams of the run's seed (RunContext.generator offsets).
_RETAIN_ORDER_STREAM, _FORGET_ORDER_STREAM = 0, 1


def matching_loss(phi: torch.Tensor, targets: torch.Tensor, matched: torch.Tensor) -> torch.Tensor:
    """Mean gap between the scores and their targets over the ``matched`` rows (a bool mask; the others cost
    nothing): squared within one unit of phi, linear beyond (Huber, doubled so its curvature is the squared
    gap's). Both ways: a matched sample pushed past its target is pulled back, which keeps the method from
    over-forgetting (clipping at the target alone over-forgot on mnist5k). Linear far off: a memorised wrong
    label sits 20+ units above its target, and its squared gap's gradient dragged whole classes down."""
    return (2 * F.huber_loss(phi, targets, reduction="none", delta=1.0) * matched).mean()


MATCHING, REPAIR = "matching", "repair"


def treatment(forget: TensorSplit, retain: TensorSplit, config: CalibratedConfig) -> dict[str, Any]:
    """What ``run`` does with this forget set, and why: ``matching`` (the calibrated treatment), or
    ``repair`` where the forget set holds more than ``config.max_class_share`` of one class's samples."""
    forget_labels, retain_labels = forget.require_labels(), retain.require_labels()
    classes = int(torch.cat([forget_labels, retain_labels]).max()) + 1
    forgotten = torch.bincount(forget_labels, minlength=classes)
    share = forgotten / (forgotten + torch.bincount(retain_labels, minlength=classes)).clamp(min=1)
    label = int(share.argmax())
    largest = round(float(share[label]), 4)
    routed = largest > config.max_class_share
    return {
        "name": REPAIR if routed else MATCHING,
        "largest_class_share": {"class": label, "share": largest, "limit": config.max_class_share},
        "why": (
            f"the forget set holds {largest:.1%} of class {label}'s samples (more than "
            f"{config.max_class_share:.0%}): per-sample targets would keep what the class's other samples "
            "taught, which a retrain without them would not"
        )
        if routed
        else None,
    }


def with_retrain_budget(config: CalibratedConfig, recipe: TrainingConfig, retained: int) -> CalibratedConfig:
    """``config`` told how many steps an exact retrain with ``recipe`` takes on ``retained`` rows, unless its
    caller set that already."""
    if config.retrain_steps is not None:
        return config
    return dataclasses.replace(config, retrain_steps=recipe.epochs * math.ceil(retained / recipe.batch_size))


def step_floor(config: CalibratedConfig) -> int:
    """``min_steps``, capped at ``max_retrain_share`` of a retrain's steps where those are known."""
    if config.retrain_steps is None:
        return config.min_steps
    return min(config.min_steps, math.ceil(config.max_retrain_share * config.retrain_steps))


def run(
    model: nn.Module,
    spec: ModelSpec,
    forget: TensorSplit,
    retain: TensorSplit,
    config: UnlearnConfig,
    ctx: RunContext,
) -> nn.Module:
    config = config_as(config, CalibratedConfig, "calibrated")
    require_remaining(retain, "calibrated")
    if treatment(forget, retain, config)["name"] == REPAIR:
        return repair.run(model, spec, forget, retain, RepairConfig(seed=config.seed), ctx)
    forget_labels = forget.require_labels()
    labels = retain.require_labels()
    if forget.targets is None:
        raise ValueError(
            "calibrated needs steering targets for the forgotten samples (their steering references' OUT "
            "scores); none were given"
        )
    device = ctx.runtime.device
    targets = forget.targets.to(device, torch.float64)
    steps = steps_over_retain(len(retain), config.epochs, config.batch_size, step_floor(config))
    model.to(device)
    with torch.no_grad():  # matched: the samples the model handed in scores above their targets
        model.eval()
        matched = stable_logit(model(forget.x.to(device)), forget_labels.to(device)) > targets
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr)
    scheduler = cosine_after_two(optimiser, steps)
    scaler = ctx.runtime.grad_scaler()
    retain_order = Cycler(len(retain), ctx.generator(_RETAIN_ORDER_STREAM))
    forget_order = Cycler(len(forget), ctx.generator(_FORGET_ORDER_STREAM))
    per_step = min(config.forget_batch, len(forget))
    epochs = math.ceil(steps * config.batch_size / len(retain))
    unlearning_mode(model, config)
    for step in range(1, steps + 1):
        rows = retain_order.take(config.batch_size)
        forget_rows = forget_order.take(per_step)
        # One forward over both, so BatchNorm (train mode) sees one batch, as Retrain's would.
        x = torch.cat([retain.x[rows], forget.x[forget_rows]]).to(device, non_blocking=True)
        with ctx.runtime.autocast():
            logits = model(x)
        ce = F.cross_entropy(logits[: len(rows)].float(), labels[rows].to(device))
        phi = stable_logit(logits[len(rows) :], forget_labels[forget_rows].to(device))
        picked = forget_rows.to(device)
        gap = matching_loss(phi, targets[picked], matched[picked])
        loss = ce + config.pull * gap.float()
        optimiser.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimiser)
        scaler.update()
        scheduler.step()
        epoch = min(epochs, 1 + (step - 1) * config.batch_size // len(retain))
        ctx.step(step, steps, epoch, epochs, {"ce": float(ce.detach()), "gap": float(gap.detach())})
    return model
