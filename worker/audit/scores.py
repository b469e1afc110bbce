"""The per-sample membership score: the stable logit of the labelled class.

phi(x, y) = log p_y - log(sum_{j != y} p_j) = z_y - logsumexp_{j != y} z_j, computed from the logits so it
neither saturates (a confidence of 1 - 1e-9 still has a finite, comparable score) nor loses precision.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.special import logsumexp
from torch import nn

from worker.engine.context import RunContext
from worker.engine.runtime import Runtime
from worker.engine.scores import stable_logit
from worker.engine.training import predict_logits

__all__ = ["membership_scores", "stable_logit", "stable_logit_all_labels"]


def membership_scores(model: nn.Module, x: torch.Tensor, labels: np.ndarray, runtime: Runtime) -> np.ndarray:
    """phi of ``model`` (eval mode, test-time behaviour) on every row of ``x`` at ``labels``."""
    logits = predict_logits(model, x, RunContext(runtime=runtime))
    return stable_logit(logits, torch.from_numpy(labels)).numpy()


def stable_logit_all_labels(logits: np.ndarray) -> np.ndarray:
    """phi at every label: (..., C) logits -> (..., C) scores, in float64."""
    z = logits.astype(np.float64)
    n_classes = z.shape[-1]
    leave_one_out = np.where(np.eye(n_classes, dtype=bool), -np.inf, 0.0)  # row l drops class l
    return z - logsumexp(z[..., None, :] + leave_one_out, axis=-1)
