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
from worker.engine.methods._loops import Cycler, config_as, require_remaining, unlearning_mode
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


def head_of(model: nn.Module, count: int) -> tuple[str, nn.Module]:
    """The smallest submodule holding the last ``count`` weighted layers: with ``head_only`` the repair trains
    it alone, on its inputs computed once."""
    names = {id(m): name for name, m in model.named_modules()}
    targets = [names[id(layer)] for layer in weighted_layers(model)[-count:]]
    prefix = targets[0].split(".")
    for target in targets[1:]:
        parts = target.split(".")
        common = 0
        while common < min(len(prefix), len(parts)) and prefix[common] == parts[common]:
            common += 1
        prefix = prefix[:common]
    if not prefix:
        raise ValueError(
            f"the last {count} weighted layers are not inside one submodule: head_only needs them to be"
        )
    name = ".".join(prefix)
    return name, model.get_submodule(name)


@torch.no_grad()
def head_inputs(model: nn.Module, head: nn.Module, x: torch.Tensor, ctx: RunContext) -> torch.Tensor:
    """What ``head`` receives for each row of ``x`` in ``model``'s forward pass (eval mode), checked to be
    all the model's output depends on: the model's logits must be ``head(input)``."""
    captured: list[torch.Tensor] = []

    def capture(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        captured.append(inputs[0].detach())

    handle = head.register_forward_pre_hook(capture)
    model.eval()
    device = ctx.runtime.device
    try:
        outputs = [model(x[i : i + 512].to(device)) for i in range(0, len(x), 512)]
    finally:
        handle.remove()
    inputs = torch.cat(captured)
    if len(inputs) != len(x) or not torch.allclose(head(inputs[:64]), outputs[0][:64], atol=1e-5):
        raise ValueError("head_only: the model's output is not its head's output on the head's input")
    return inputs


def _importance(model: nn.Module, split: TensorSplit, batch_size: int, ctx: RunContext) -> list[torch.Tensor]:
    """Diagonal Fisher estimate per parameter: mean over batches of the squared gradient of the batch loss."""
    device = ctx.runtime.device
    params = [p for p in model.parameters()]
    total = [torch.zeros_like(p) for p in params]
    labels = split.require_labels()
    batches = 0
    model.eval()
    for i in range(0, len(split), batch_size):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(
            model(split.x[i : i + batch_size].to(device)), labels[i : i + batch_size].to(device)
        ).backward()
        for t, p in zip(total, params, strict=True):
            if p.grad is not None:
                t += p.grad.detach() ** 2
        batches += 1
    model.zero_grad(set_to_none=True)
    return [t / batches for t in total]


@torch.no_grad()
def dampen(
    model: nn.Module, forget: TensorSplit, retain: TensorSplit, config: RepairConfig, ctx: RunContext
) -> None:
    """Selective synaptic dampening (Foster et al., AAAI 2024): parameters far more important to D_f than
    to D_r are scaled down in proportion."""
    with torch.enable_grad():
        on_forget = _importance(model, forget, config.batch_size, ctx)
        on_retain = _importance(model, retain, config.batch_size, ctx)
    for p, f, r in zip(model.parameters(), on_forget, on_retain, strict=True):
        chosen = f > config.dampen_alpha * r
        factor = (config.dampen_lambda * r / f.clamp_min(1e-30)).clamp(max=1.0)
        p.mul_(torch.where(chosen, factor, torch.ones_like(p)))


def repair_steps(n: int, config: RepairConfig) -> int:
    """Optimiser steps of the repair: ``config.epochs`` passes over ``n`` rows, at least ``min_steps``."""
    return max(config.min_steps, math.ceil(config.epochs * n / config.batch_size), 1)


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
    steps = repair_steps(len(retain), config)
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
    base = copy.deepcopy(model) if config.match_steps else None
    loss_of = _distilled_loss(_frozen_copy(model), config.distill) if config.distill > 0 else cross_entropy
    if config.dampen_alpha > 0:
        dampen(model, forget, retain, config, ctx)
    reinitialise_last(model, fresh_model(spec, ctx.generator(_FRESH_STREAM)).to(device), config.reinit_layers)

    trained, inputs = model, retain.x
    if config.head_only:
        _, trained = head_of(model, config.reinit_layers)
        inputs = head_inputs(model, trained, retain.x, ctx)
    optimiser = torch.optim.Adam(trained.parameters(), lr=config.lr)
    # The first two steps at lr, then a cosine decay that reaches 0 at the last step.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: 0.5 * (1 + math.cos(math.pi * max(0, step - 1) / max(1, steps - 1)))
    )
    scaler = ctx.runtime.grad_scaler()
    order = Cycler(len(retain), ctx.generator(_ORDER_STREAM))
    epochs = math.ceil(steps * config.batch_size / len(retain))
    unlearning_mode(trained, config)
    replayed = round(config.replay * config.batch_size)
    # Each D_r row's loss when last seen (a fresh classifier's chance loss until then): the replay share of a
    # batch is drawn in proportion to it, so the rows the repair has not fitted yet come back most.
    last_loss = torch.full((len(retain),), math.log(spec.num_classes))
    replay_draw = ctx.generator(5)
    seen: list[torch.Tensor] = []

    def tracked(logits: torch.Tensor, _x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        per_row = F.cross_entropy(logits, y, reduction="none")
        seen.append(per_row.detach().float().cpu())
        return per_row.mean()

    for step in range(1, steps + 1):
        rows = order.take(config.batch_size - replayed)
        if replayed:
            rows = torch.cat(
                [rows, torch.multinomial(last_loss, replayed, replacement=True, generator=replay_draw)]
            )
        loss = supervised_step(
            trained, optimiser, scaler, inputs[rows], labels[rows], ctx, tracked if replayed else loss_of
        )
        if replayed:
            last_loss[rows] = seen.pop().clamp_min(1e-6)
        scheduler.step()
        epoch = min(epochs, 1 + (step - 1) * config.batch_size // len(retain))
        ctx.step(before + step, total, epoch, epochs, {"ce": float(loss.detach())})
    if base is not None:
        return _match(base, model, forget, retain, config, ctx)
    return model


def _match(
    base: nn.Module,
    teacher: nn.Module,
    forget: TensorSplit,
    retain: TensorSplit,
    config: RepairConfig,
    ctx: RunContext,
) -> nn.Module:
    """The base model fine-tuned to give D_f the repaired model's outputs while keeping D_r's labels."""
    device = ctx.runtime.device
    teacher.eval()
    with torch.no_grad():
        target = F.log_softmax(teacher(forget.x.to(device)).float(), dim=1)
    labels = retain.require_labels()
    optimiser = torch.optim.Adam(base.parameters(), lr=config.match_lr)
    forget_order = Cycler(len(forget), ctx.generator(3))
    retain_order = Cycler(len(retain), ctx.generator(4))
    unlearning_mode(base, config)
    for _ in range(config.match_steps):
        f = forget_order.take(min(config.batch_size, len(forget)))
        r = retain_order.take(config.batch_size)
        kl = F.kl_div(
            F.log_softmax(base(forget.x[f].to(device)).float(), dim=1),
            target[f.to(device)],
            reduction="batchmean",
            log_target=True,
        )
        ce = F.cross_entropy(base(retain.x[r].to(device)), labels[r].to(device))
        optimiser.zero_grad(set_to_none=True)
        (kl + ce).backward()
        optimiser.step()
    return base
