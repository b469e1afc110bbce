"""UGradSL / UGradSL+ (gradient-based unlearning with negative label smoothing; Algorithm 1, Eq. 8).

loss = p * CE(B_r) - (1 - p) * CE_NLS(B_f), where CE_NLS uses the smoothed target y_ls = (1 - a) * onehot(y) +
a / K with a < 0 (Eq. 37 expands it into the weighted per-class losses). Eq. 8 sums over the batches; we take
batch means, which only rescales the learning rate. UGradSL (``loop_over="forget"``) ends an epoch after one
pass over D_f with a random D_r batch per step; UGradSL+ (``"retain"``) after one pass over D_r, D_f batches
being revisited.

Self-adaptive rate (``adaptive=True``, Algorithm 1 lines 6-10): for each forget sample j, c_j counts the
retain samples of the paired batch whose cosine distance to it is below ``distance_threshold`` (beta), and
a_j = smoothing * c_j / |B_r|. The paper is inconsistent about direction: Algorithm 1 (a_j = c_j / |B_f|),
Sec. 4 ("a dense neighbourhood of D_r ... a smaller a_i", a_i being negative) and D.2 (samples close to D_r
"receive a higher smoothing rate") give samples close to D_r the stronger smoothing, while D.1 says their
confidence "should not be decreased too much". We follow the majority: the rate grows in magnitude with the
fraction of close retain samples, stays negative, and never exceeds |smoothing| (a forget sample far
from every retain sample gets a = 0, plain gradient ascent). Features are the inputs of the model's last
linear layer (the penultimate features: after a ReLU in both built-in heads, so cosine distances lie in
[0, 1] as the paper states), taken from the model being unlearned, in the loss's own forward pass, without
gradient.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from worker.engine.config import UGradSLConfig
from worker.engine.context import RunContext
from worker.engine.data import TensorSplit
from worker.engine.methods._loops import PairedBatch, run_paired
from worker.engine.spec import ModelSpec


def smoothed_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, smoothing: torch.Tensor
) -> torch.Tensor:
    """Batch mean of -sum_k y_ls[k] log softmax(logits)[k], y_ls = (1 - a) onehot + a / K, per-sample
    ``smoothing`` a of shape (N,) or a scalar. Written out because a < 0 gives negative target entries."""
    num_classes = logits.shape[1]
    a = smoothing.reshape(-1, 1)
    target = (1 - a) * F.one_hot(labels, num_classes).float() + a / num_classes
    return -(target * torch.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


def adaptive_smoothing(
    features_f: torch.Tensor, features_r: torch.Tensor, smoothing: float, threshold: float
) -> torch.Tensor:
    """Per-forget-sample rate smoothing * c_j / |B_r| (Algorithm 1 lines 8-10; direction: module doc)."""
    cosine = F.normalize(features_f.float(), dim=1) @ F.normalize(features_r.float(), dim=1).T
    close = (1 - cosine) < threshold  # (|B_f|, |B_r|) cosine distances below beta
    return smoothing * close.float().mean(dim=1)


class _PenultimateTap:
    """Captures the input of the model's last ``nn.Linear`` (detached) on every forward."""

    def __init__(self, model: nn.Module) -> None:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError("adaptive UGradSL needs a model whose classifier ends in an nn.Linear")
        self.features: torch.Tensor | None = None
        self._handle = linears[-1].register_forward_pre_hook(self._capture)

    def _capture(self, _module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        self.features = inputs[0].detach().flatten(1)

    def close(self) -> None:
        self._handle.remove()


def run(
    model: nn.Module,
    spec: ModelSpec,
    forget: TensorSplit,
    retain: TensorSplit,
    config: UGradSLConfig,
    ctx: RunContext,
) -> nn.Module:
    device = ctx.runtime.device
    y_f, y_r = forget.require_labels().to(device), retain.require_labels().to(device)
    tap = _PenultimateTap(model) if config.adaptive else None
    fixed_rate = torch.tensor(config.smoothing, device=device)

    def loss_fn(batch: PairedBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        size = len(batch.rows_f)
        # One forward over [B_f; B_r]: identical to two while BatchNorm is frozen (the default).
        logits = model(torch.cat([batch.x_f, batch.x_r]))
        rate = fixed_rate
        if tap is not None:
            assert tap.features is not None
            rate = adaptive_smoothing(
                tap.features[:size], tap.features[size:], config.smoothing, config.distance_threshold
            )
        ce_r = F.cross_entropy(logits[size:].float(), y_r[batch.rows_r.to(device)])
        nls_f = smoothed_cross_entropy(logits[:size], y_f[batch.rows_f.to(device)], rate)
        values = {"ce_retain": ce_r, "nls_forget": nls_f}
        if tap is not None:
            values["smoothing"] = rate.mean()
        return config.p * ce_r - (1 - config.p) * nls_f, values

    try:
        return run_paired(model, forget, retain, config, ctx, loss_fn, loop_over=config.loop_over)
    finally:
        if tap is not None:
            tap.close()
