"""NegGrad: gradient descent on a D_r batch and ascent on a D_f batch, loss = w * CE(B_r) - CE(B_f) (paper
A.3, w = ``retain_weight``). One epoch is one pass over D_f."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from worker.engine.config import NegGradConfig
from worker.engine.context import RunContext
from worker.engine.data import TensorSplit
from worker.engine.methods._loops import PairedBatch, run_paired
from worker.engine.spec import ModelSpec


def run(
    model: nn.Module,
    spec: ModelSpec,
    forget: TensorSplit,
    retain: TensorSplit,
    config: NegGradConfig,
    ctx: RunContext,
) -> nn.Module:
    device = ctx.runtime.device
    y_f, y_r = forget.require_labels().to(device), retain.require_labels().to(device)

    def loss_fn(batch: PairedBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        size = len(batch.rows_f)
        # One forward over [B_f; B_r]: identical to two while BatchNorm is frozen (the default).
        logits = model(torch.cat([batch.x_f, batch.x_r]))
        ce_f = F.cross_entropy(logits[:size], y_f[batch.rows_f.to(device)])
        ce_r = F.cross_entropy(logits[size:], y_r[batch.rows_r.to(device)])
        return config.retain_weight * ce_r - ce_f, {"ce_retain": ce_r, "ce_forget": ce_f}

    return run_paired(model, forget, retain, config, ctx, loss_fn)
