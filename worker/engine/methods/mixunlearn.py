"""MixUnlearn (ICLR 2025): adversarial mixup unlearning (Sec. 4; hyper-parameters A.1).

The initial model f_D plays three roles, kept as separate objects here:
1. a frozen feature source h_D for the generator (Eq. 2), read by ``FeatureTap`` at ``spec.feature_layer``
   (MNIST CNN: conv1's block, 16 x 14 x 14, see worker/engine/spec.py; ResNet-18: layer3, 256 channels);
2. the target provider p(x) (Eq. 4): one-hot labels (label-aware) or Sharpen(softmax(f_D(x)), T)
   (label-agnostic, where labels are never read: the splits may carry y=None);
3. the initialisation of the unlearner f_U: the ``model`` passed in (``api.unlearn`` hands us a copy).

One epoch is one pass over D_f in batches of ``batch_size``; each forgetting batch is paired with a
remaining batch of the same size. Every ``generator_every``-th step the MixBlock takes an Adam step on L_gen
(Eq. 3) with the unlearner frozen; every step the unlearner takes an Adam step on L_mix + omega * L_real
(Eq. 7) with the mask detached.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from worker.engine.config import MixUnlearnConfig, UnlearnConfig
from worker.engine.context import RunContext
from worker.engine.data import TensorSplit
from worker.engine.methods._loops import (
    Cycler,
    config_as,
    frozen_copy,
    numpy_stream,
    require_remaining,
    unlearning_mode,
)
from worker.engine.methods.losses import gen_loss, mix_loss, real_loss, sharpen
from worker.engine.methods.mixblock import Lambda, MixBlock, apply_mask, at_least_float32
from worker.engine.models import FeatureTap
from worker.engine.spec import ModelSpec
from worker.engine.training import batches

# Independent random streams drawn from the run's seed (RunContext.generator offsets).
_ORDER_STREAM, _RETAIN_STREAM, _LAMBDA_STREAM, _INIT_STREAM = 0, 1, 2, 3
_CACHE_BATCH = 512


class _Reference:
    """Roles 1 and 2 of f_D: a frozen copy giving h_D(x) (when a MixBlock reads it) and p(x), without grad."""

    def __init__(
        self,
        initial: nn.Module | None,
        spec: ModelSpec,
        config: MixUnlearnConfig,
        ctx: RunContext,
        with_features: bool,
    ) -> None:
        self.spec = spec
        self.config = config
        self.ctx = ctx
        self.model = initial
        self.tap = FeatureTap(initial, spec) if initial is not None and with_features else None

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor]:
        features: torch.Tensor | None = None
        logits: torch.Tensor | None = None
        if self.tap is not None:
            with self.ctx.runtime.autocast():
                logits, features = self.tap(x)
        elif self.config.label_agnostic:
            assert self.model is not None
            with self.ctx.runtime.autocast():
                logits = self.model(x)
        if not self.config.label_agnostic:
            assert y is not None
            return features, F.one_hot(y, self.spec.num_classes).float()
        assert logits is not None
        probs = torch.softmax(at_least_float32(logits), dim=1)
        # Eq. 4 / A.12; the "w/o Sharpen" ablation (Table 3) uses f_D's plain softmax.
        return features, sharpen(probs, self.config.sharpen_temperature) if self.config.use_sharpen else probs

    def close(self) -> None:
        if self.tap is not None:
            self.tap.close()


def _labels(split: TensorSplit, config: MixUnlearnConfig) -> torch.Tensor | None:
    # Label-agnostic mode must never read y (it may be absent, or not be ours to read).
    return None if config.label_agnostic else split.require_labels()


def run(
    model: nn.Module,
    spec: ModelSpec,
    forget: TensorSplit,
    retain: TensorSplit,
    config: UnlearnConfig,
    ctx: RunContext,
) -> nn.Module:
    config = config_as(config, MixUnlearnConfig, "mixunlearn")
    require_remaining(retain, "MixUnlearn")
    device = ctx.runtime.device
    y_f, y_r = _labels(forget, config), _labels(retain, config)
    use_generator = config.use_mixblock and config.use_mix_loss

    # Roles 1-2: a frozen copy of f_D, made only when its features (MixBlock) or predictions (label-agnostic)
    # are used.
    initial: nn.Module | None = None
    if use_generator or config.label_agnostic:
        initial = frozen_copy(model).to(device)
    reference = _Reference(initial, spec, config, ctx, with_features=use_generator)
    try:
        # f_D's features and targets on D_f are computed once (every epoch revisits all of D_f).
        cached = [
            reference(forget.x[rows].to(device), None if y_f is None else y_f[rows].to(device))
            for rows in torch.arange(len(forget)).split(_CACHE_BATCH)
        ]
        target_f_all = torch.cat([t for _, t in cached])
        features_f_all = torch.cat([f for f, _ in cached if f is not None]) if use_generator else None
        del cached

        # Role 3: the unlearner is the model we were handed.
        unlearner = model.to(device)
        params = [p for p in unlearner.parameters() if p.requires_grad]
        # Optimiser (open choice; the paper does not say): Adam, as in the LAF / AdAutoMix lineage.
        optimiser = torch.optim.Adam(params, lr=config.lr)
        scaler = ctx.runtime.grad_scaler()
        adversary: _Adversary | None = None
        if use_generator:
            assert features_f_all is not None
            adversary = _Adversary(features_f_all.shape[1], forget.x.shape[-2:], config, ctx)

        order = ctx.generator(_ORDER_STREAM)
        retain_rows = Cycler(len(retain), ctx.generator(_RETAIN_STREAM))
        lam_rng = numpy_stream(ctx.generator(_LAMBDA_STREAM))
        steps_per_epoch = -(-len(forget) // config.batch_size)
        # A tiny forget set still gets ``min_steps`` updates: a constant floor, so cost stays O(|D_f|).
        epochs = max(config.epochs, -(-config.min_steps // steps_per_epoch))
        total = steps_per_epoch * epochs
        step = 0
        l_gen: float | None = None
        # BatchNorm (open choice, config.batchnorm, default "eval"): running statistics stay frozen, as in the
        # LAF lineage; the forget/remain batches are small and skewed. Dropout and the like train.
        unlearning_mode(unlearner, config)
        for epoch in range(1, epochs + 1):
            for rows_f in batches(len(forget), config.batch_size, order):
                size = len(rows_f)
                rows_r = retain_rows.take(size)
                x_f = forget.x[rows_f].to(device, non_blocking=True)
                x_r = retain.x[rows_r].to(device, non_blocking=True)
                target_f = target_f_all[rows_f.to(target_f_all.device)]
                # Targets are paired with the images actually mixed (row i of x_r is the one mixed with row i
                # of x_f; the public class permutes images but not targets).
                features_r, target_r = reference(x_r, None if y_r is None else y_r[rows_r].to(device))
                # lambda ~ Beta(alpha, alpha) (A.1); one per batch as in mixup/AdAutoMix (open choice:
                # lambda_per_sample draws one per pair).
                draw = lam_rng.beta(config.alpha, config.alpha, size if config.lambda_per_sample else None)
                lam = torch.as_tensor(draw, dtype=torch.float32, device=device)

                x_mix: torch.Tensor | None = None
                if config.use_mix_loss:
                    if adversary is not None:
                        assert features_f_all is not None and features_r is not None
                        features_f = features_f_all[rows_f.to(features_f_all.device)]
                        pair = _Pair(x_f, x_r, features_f, features_r, target_f, target_r, lam)
                        # The generator steps at iterations 0, k, 2k, ... (k = generator_every, paper 4.2).
                        if step % config.generator_every == 0:
                            mask, l_gen = adversary.step(pair, unlearner, params)
                        else:
                            mask = adversary.mask(pair)
                        x_mix = apply_mask(x_f, x_r, mask)
                    else:
                        # "w/o MB" ablation (Table 3): vanilla mixup with the same contrastive losses.
                        lam_img = lam.reshape(-1, 1, 1, 1) if lam.dim() else lam
                        x_mix = lam_img * x_f + (1 - lam_img) * x_r

                # One forward over [x_mix; x_r; x_f]: identical to three forwards while BatchNorm is in eval
                # mode (the default); with batchnorm="train" the statistics are those of the union of the
                # three groups.
                parts = ([x_mix] if x_mix is not None else []) + ([x_r, x_f] if config.use_real_loss else [])
                with ctx.runtime.autocast():
                    logits = unlearner(torch.cat(parts))
                probs = torch.softmax(at_least_float32(logits), dim=1)
                losses: dict[str, float] = {}
                loss = torch.zeros((), device=device)
                if x_mix is not None:
                    value = mix_loss(probs[:size], target_r, target_f, lam, config.tau_mix)
                    loss = loss + value
                    losses["l_mix"] = float(value.detach())
                if config.use_real_loss:
                    probs_r, probs_f = probs[-2 * size : -size], probs[-size:]
                    value = real_loss(probs_r, target_r, probs_f, target_f, config.tau_real)
                    loss = loss + config.omega * value
                    losses["l_real"] = float(value.detach())
                optimiser.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimiser)
                scaler.update()
                step += 1
                if l_gen is not None:
                    losses["l_gen"] = l_gen
                ctx.step(step, total, epoch, epochs, losses)
    finally:
        reference.close()
    return unlearner.eval()


@dataclass(frozen=True)
class _Pair:
    """One step's paired batches: row i of x_f is mixed with row i of x_r, with their targets and features."""

    x_f: torch.Tensor
    x_r: torch.Tensor
    features_f: torch.Tensor
    features_r: torch.Tensor
    target_f: torch.Tensor
    target_r: torch.Tensor
    lam: Lambda


class _Adversary:
    """The generator g (Eq. 2): a MixBlock on f_D's features with its own Adam (``generator_lr``)."""

    def __init__(
        self, in_channels: int, out_size: torch.Size, config: MixUnlearnConfig, ctx: RunContext
    ) -> None:
        self.block = MixBlock(in_channels, config.lambda_channel, ctx.generator(_INIT_STREAM))
        self.block.to(ctx.runtime.device)
        self.optimiser = torch.optim.Adam(self.block.parameters(), lr=config.generator_lr)
        self.scaler = ctx.runtime.grad_scaler()
        self.out_size = out_size
        self.config = config
        self.ctx = ctx

    def _mask(self, pair: _Pair) -> torch.Tensor:
        return self.block(pair.features_f, pair.features_r, pair.lam, self.out_size)

    @torch.no_grad()
    def mask(self, pair: _Pair) -> torch.Tensor:
        with self.ctx.runtime.autocast():
            return self._mask(pair)

    def step(
        self, pair: _Pair, unlearner: nn.Module, unlearner_params: list[nn.Parameter]
    ) -> tuple[torch.Tensor, float]:
        """One Adam step on L_gen (Eq. 3) through the frozen unlearner (eval mode, no parameter grads; the
        mask is not detached). Returns the detached mask it was computed with, which the unlearner step then
        reuses, and the loss value."""
        unlearner.eval()
        for p in unlearner_params:
            p.requires_grad_(False)
        try:
            with self.ctx.runtime.autocast():
                mask = self._mask(pair)
                logits = unlearner(apply_mask(pair.x_f, pair.x_r, mask))
            probs = torch.softmax(at_least_float32(logits), dim=1)
            loss = gen_loss(probs, pair.target_r, pair.target_f, pair.lam, self.config.tau_gen)
            self.optimiser.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimiser)
            self.scaler.update()
        finally:
            for p in unlearner_params:
                p.requires_grad_(True)
            unlearning_mode(unlearner, self.config)
        return mask.detach(), float(loss.detach())
