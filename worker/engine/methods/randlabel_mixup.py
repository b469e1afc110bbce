"""randlabel-mixup (label-agnostic): random labels on D_f (RandLabel's targets) mixed with D_r by vanilla
mixup, squared error on softmax probabilities, plus a term keeping D_r's outputs. Labels are never read. One
epoch is one pass over D_f.

Not the paper's L-Mix. MixUnlearn's L-Mix baseline (Sec. 5.2) "extends the LAF by incorporating mixup": its
MSE on mixed samples is applied on top of LAF (Shen et al. 2024: VAE-based representation alignment of D_f
and D_r), which this method does not implement. It was called ``lmix`` until it was renamed for what it is;
``make_config("lmix")`` now refuses with a ConfigError naming ``randlabel-mixup``.

x_mix = lam * x_f + (1 - lam) * x_r, lam ~ Beta(alpha, alpha), one per batch (vanilla mixup); its target is
lam * onehot(r_f) + (1 - lam) * softmax(f_D(x_r)), with r_f a random label drawn once per forget sample and
f_D the frozen initial model (its self-generated prediction stands in for the unread D_r label).
loss = ||softmax(f(x_mix)) - target||^2 + w * ||softmax(f(x_r)) - softmax(f_D(x_r))||^2, w = retain_weight.
"""

from __future__ import annotations

import torch
from torch import nn

from worker.engine.config import RandLabelMixupConfig
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
    config: RandLabelMixupConfig,
    ctx: RunContext,
) -> nn.Module:
    device = ctx.runtime.device
    initial = frozen_copy(model).to(device)
    targets_f = random_onehot(len(forget), spec.num_classes, ctx.generator(METHOD_STREAM)).to(device)
    lam_rng = numpy_stream(ctx.generator(METHOD_STREAM + 1))

    def loss_fn(batch: PairedBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        lam = float(lam_rng.beta(config.alpha, config.alpha))
        with torch.no_grad():
            keep_r = torch.softmax(initial(batch.x_r).float(), dim=1)
        x_mix = lam * batch.x_f + (1 - lam) * batch.x_r
        target_mix = lam * targets_f[batch.rows_f.to(device)] + (1 - lam) * keep_r
        logits = model(torch.cat([x_mix, batch.x_r]))
        size = len(batch.rows_f)
        mix_term = prob_mse(logits[:size], target_mix)
        retain_term = prob_mse(logits[size:], keep_r)
        return mix_term + config.retain_weight * retain_term, {"mse_mix": mix_term, "mse_retain": retain_term}

    return run_paired(model, forget, retain, config, ctx, loss_fn)
