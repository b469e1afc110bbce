"""UGradSL / UGradSL+ (gradient-based unlearning with negative label smoothing; Algorithm 1, Eq. 8).

loss = p * CE(B_r) - (1 - p) * CE_NLS(B_f), where CE_NLS uses the smoothed target y_ls = (1 - a) * onehot(y) +
a / K with a < 0 (Eq. 37 expands it into the weighted per-class losses). Eq. 8 sums over the batches; we take
batch means, which only rescales the learning rate. UGradSL (``loop_over="forget"``) ends an epoch after one
pass over D_f with a random D_r batch per step; UGradSL+ (``"retain"``) after one pass over D_r, D_f batches
being revisited.

Self-adaptive rate (``adaptive=True``, Algorithm 1 lines 6-10, D.4, D.5): for each forget sample j, c_j counts
the retain samples of the paired batch whose distance to it is below beta, and a_j = smoothing * c_j / |B|
(|B_f| = |B_r| = |B| in a paired batch). As the paper's code (D.4) computes it, the distance is the cosine
distance rescaled to [0, 1], d = (1 - cos) / 2, between the L2-normalised features. beta
(``distance_threshold``) defaults to the paper's choice (D.5: "the median of all pairwise distances"): the
median of the |B_f| x |B_r| distances of the current batch, the only pairwise distances Algorithm 1
computes (line 8), so it is recomputed at every step; a number fixes beta instead. The median is the usual
one (the mean of the two middle values for an even count), so about half of each batch's pairs are "close".

Two places where the paper disagrees with itself, and what we follow:
- Count axis. Algorithm 1 (line 9), D.1 and D.2 count, for each forget sample, the close retain samples; the
  D.4 snippet's ``close_mask.sum(dim=0)`` on its (forget x retain) mask counts, for each retain sample, the
  close forget samples (same shape, since |B_f| = |B_r|, but the per-retain count has no forget sample to
  belong to). We follow the algorithm: a_j belongs to forget sample j.
- Direction. Algorithm 1 (a_j = c_j / |B_f|), Sec. 4 ("a dense neighbourhood of D_r ... a smaller a_i", a_i
  being negative) and D.2 (samples close to D_r "receive a higher smoothing rate") give samples close to D_r
  the stronger smoothing, while D.1 says their confidence "should not be decreased too much". We follow the
  majority: the rate grows in magnitude with the fraction of close retain samples, stays negative, and never
  exceeds |smoothing| (a forget sample far from every retain sample gets a = 0, plain gradient ascent).

Features are the inputs of the model's last linear layer (the penultimate features), taken from the model
being unlearned (Algorithm 1 line 7: h_theta_f), in the loss's own forward pass, without gradient.
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


def cosine_distances(features_f: torch.Tensor, features_r: torch.Tensor) -> torch.Tensor:
    """(|B_f|, |B_r|) distances d = (1 - cos) / 2 in [0, 1], as the paper's code computes them (D.4)."""
    cosine = F.normalize(features_f.float(), dim=1) @ F.normalize(features_r.float(), dim=1).T
    return (1 - cosine) / 2


def median(values: torch.Tensor) -> torch.Tensor:
    """The median of all entries: the middle value, or the mean of the two middle values for an even count."""
    ordered = values.flatten().sort().values
    middle = ordered.numel() // 2
    return ordered[middle] if ordered.numel() % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def adaptive_smoothing(
    features_f: torch.Tensor, features_r: torch.Tensor, smoothing: float, threshold: float | None
) -> torch.Tensor:
    """Per-forget-sample rate smoothing * c_j / |B_r|, c_j = #{i : d(f_j, r_i) < beta} (Algorithm 1 lines
    8-10); beta = ``threshold``, or the median of the batch's pairwise distances when None (D.5)."""
    distance = cosine_distances(features_f, features_r)
    beta = median(distance) if threshold is None else torch.tensor(threshold, device=distance.device)
    close = distance < beta  # (|B_f|, |B_r|)
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
