"""RandLabel (label-agnostic): fit D_f to random labels and keep D_r's outputs, both as squared error on
softmax probabilities. Labels are never read. One epoch is one pass over D_f.

loss = ||softmax(f(x_f)) - onehot(r_f)||^2 + w * ||softmax(f(x_r)) - softmax(f_D(x_r))||^2, where r_f is a
random label drawn once per forget sample (a fixed relabelling of D_f, as the random-label baselines do) and
f_D is the frozen initial model.
"""

from __future__ import annotations

import torch
from torch import nn

from worker.engine.config import RandLabelConfig, RandLabelMixupConfig
from worker.engine.context import RunContext
from worker.engine.data import TensorSplit
from worker.engine.methods._loops import (
    METHOD_STREAM,
    PairedBatch,
    frozen_copy,
    numpy_stream,
    prob_mse,
    random_onehot,
    run_paired,
)
from worker.engine.spec import ModelSpec


def run(
    model: nn.Module,
    spec: ModelSpec,
    forget: TensorSplit,
    retain: TensorSplit,
    config: RandLabelConfig,
    ctx: RunContext,
) -> nn.Module:
    return fit_random_labels(model, spec, forget, retain, config, ctx, mixup_alpha=None)


def fit_random_labels(
    model: nn.Module,
    spec: ModelSpec,
    forget: TensorSplit,
    retain: TensorSplit,
    config: RandLabelConfig | RandLabelMixupConfig,
    ctx: RunContext,
    mixup_alpha: float | None,
) -> nn.Module:
    """RandLabel's loop; with ``mixup_alpha``, randlabel-mixup's: the forget term is then on mixed inputs
    x_mix = lam * x_f + (1 - lam) * x_r, lam ~ Beta(alpha, alpha) once per batch, against the mixed target
    lam * onehot(r_f) + (1 - lam) * softmax(f_D(x_r))."""
    device = ctx.runtime.device
    initial = frozen_copy(model).to(device)
    targets_f = random_onehot(len(forget), spec.num_classes, ctx.generator(METHOD_STREAM)).to(device)
    mixup = None if mixup_alpha is None else (mixup_alpha, numpy_stream(ctx.generator(METHOD_STREAM + 1)))
    forget_name = "mse_forget" if mixup_alpha is None else "mse_mix"

    def loss_fn(batch: PairedBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        size = len(batch.rows_f)
        with torch.no_grad():
            keep_r = torch.softmax(initial(batch.x_r).float(), dim=1)
        x_f, target_f = batch.x_f, targets_f[batch.rows_f.to(device)]
        if mixup is not None:
            alpha, lam_rng = mixup
            lam = float(lam_rng.beta(alpha, alpha))
            x_f, target_f = lam * x_f + (1 - lam) * batch.x_r, lam * target_f + (1 - lam) * keep_r
        logits = model(torch.cat([x_f, batch.x_r]))
        forget_term = prob_mse(logits[:size], target_f)
        retain_term = prob_mse(logits[size:], keep_r)
        return forget_term + config.retain_weight * retain_term, {
            forget_name: forget_term,
            "mse_retain": retain_term,
        }

    return run_paired(model, forget, retain, config, ctx, loss_fn)
