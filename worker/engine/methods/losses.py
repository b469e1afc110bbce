"""MixUnlearn's losses (paper Eqs. 3, 5, 6 and A.12), computed in float32 on probability vectors.

Pairing (open choice, decided here): the i-th forgetting sample is mixed with the i-th remaining sample
only (B mixes, not B_f x B_r: all pairs would multiply the unlearner's work by the batch size), and each mix
is scored against the targets of the two images it was actually made of. With one mix per pair the
denominator of Eq. 5 no longer depends on j, so it becomes one batch-wide log-sum-exp over the pairs: the
structure Eq. 6 has by construction (its denominator never depended on j) and the one the authors' public
class uses.

Reduction (open choice): the paper sums over B_r; we average (Eq. 5 / |B_r|). Adam, used for both players,
is invariant to a constant loss scale, so this changes only the logged values (now batch-size independent)
and the weight a short final batch gets; with SGD the sum would act as a |B_r|-times larger learning rate.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from worker.engine.methods.mixblock import Lambda, at_least_float32, lambda_column


def sim_loss(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """SimLoss = 1 - cos(f(x), p(x)) per row (Sec. 4.1); in [0, 1] for probability vectors."""
    return 1 - F.cosine_similarity(at_least_float32(probs), at_least_float32(targets), dim=1)


def sharpen(q: torch.Tensor, temperature: float) -> torch.Tensor:
    """Eq. 8: q_i^(1/T) / sum_j q_j^(1/T), computed as softmax(log q / T) for stability."""
    return torch.softmax(torch.log(at_least_float32(q).clamp_min(1e-12)) / temperature, dim=1)


def _contrastive(positive: torch.Tensor, negative: torch.Tensor, tau: float) -> torch.Tensor:
    """mean_j positive_j - log sum_i exp(negative_i / tau): the temperature sits only in the denominator."""
    return positive.mean() - torch.logsumexp(negative / tau, dim=0)


def mix_loss(
    probs_mix: torch.Tensor, target_r: torch.Tensor, target_f: torch.Tensor, lam: Lambda, tau: float
) -> torch.Tensor:
    """L_mix (Eq. 5; its outer sum runs over B_r, the paper's "B_f" there is a typo). Row i of
    ``probs_mix`` is f_U(mix(x_f[i], x_r[i])); minimising it keeps x_r's target and drops x_f's."""
    lam_col = lambda_column(lam, probs_mix.shape[0], at_least_float32(probs_mix))
    positive = (1 - lam_col) * sim_loss(probs_mix, target_r)
    negative = lam_col * sim_loss(probs_mix, target_f)
    return _contrastive(positive, negative, tau)


def gen_loss(
    probs_mix: torch.Tensor, target_r: torch.Tensor, target_f: torch.Tensor, lam: Lambda, tau: float
) -> torch.Tensor:
    """L_gen (Eq. 3): Eq. 5 with the opposite sign and tau_gen; minimised by the generator only."""
    return -mix_loss(probs_mix, target_r, target_f, lam, tau)


def real_loss(
    probs_r: torch.Tensor,
    target_r: torch.Tensor,
    probs_f: torch.Tensor,
    target_f: torch.Tensor,
    tau: float,
) -> torch.Tensor:
    """L_real (Eq. 6) on the real samples: keep p(x_r) on B_r, move away from p(x_f) on B_f."""
    return _contrastive(sim_loss(probs_r, target_r), sim_loss(probs_f, target_f), tau)
