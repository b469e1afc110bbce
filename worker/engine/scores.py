"""The per-sample membership score phi (docs/audit.md): the audit tests it, and a steered method
(``calibrated``) pulls the forgotten samples' phi towards the value their steering references give.

phi(x, y) = log p_y - log(sum_{j != y} p_j) = z_y - logsumexp_{j != y} z_j, computed from the logits so it
neither saturates nor loses precision.
"""

from __future__ import annotations

import torch


def stable_logit(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """phi for each row of ``logits`` (N, C) at ``labels`` (N,), in float64 (differentiable)."""
    logits = logits.double()
    index = labels.long().unsqueeze(1)
    true_class = logits.gather(1, index).squeeze(1)
    others = logits.scatter(1, index, float("-inf"))
    return true_class - torch.logsumexp(others, dim=1)
