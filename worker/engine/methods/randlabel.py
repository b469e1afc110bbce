"""RandLabel (label-agnostic): fit D_f to random labels and keep D_r's outputs, both as squared error on
softmax probabilities. Labels are never read. One epoch is one pass over D_f.

loss = ||softmax(f(x_f)) - onehot(r_f)||^2 + w * ||softmax(f(x_r)) - softmax(f_D(x_r))||^2, where r_f is a
random label drawn once per forget sample (a fixed relabelling of D_f, as the random-label baselines do) and
f_D is the frozen initial model.
"""

from __future__ import annotations

import torch
from torch import nn

from worker.engine.config import RandLabelConfig
from worker.engine.context import RunContext
from worker.engine.data import TensorSplit
from worker.engine.methods._loops import (
    METHOD_STREAM,
    PairedBatch,
    frozen_copy,
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
    device = ctx.runtime.device
    initial = frozen_copy(model).to(device)
    targets_f = random_onehot(len(forget), spec.num_classes, ctx.generator(METHOD_STREAM)).to(device)

    def loss_fn(batch: PairedBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        size = len(batch.rows_f)
        with torch.no_grad():
            keep_r = torch.softmax(initial(batch.x_r).float(), dim=1)
        logits = model(torch.cat([batch.x_f, batch.x_r]))
        forget_term = prob_mse(logits[:size], targets_f[batch.rows_f.to(device)])
        retain_term = prob_mse(logits[size:], keep_r)
        return forget_term + config.retain_weight * retain_term, {
            "mse_forget": forget_term,
            "mse_retain": retain_term,
        }

    return run_paired(model, forget, retain, config, ctx, loss_fn)
