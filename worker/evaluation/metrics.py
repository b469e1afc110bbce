"""Population metrics shared by the benchmark and the service worker: accuracies and the population membership
attack of the LAF lineage (Shen et al. 2024), whose accuracy the paper's tables call "ASR". Percentages
(0-100). Everything is computed in eval mode, i.e. with test-time behaviour.

Which attack this is. The MixUnlearn paper's ASR column cites Shokri et al. (2017), the shadow-model attack;
the attack computed here (as in the LAF code the paper's protocol follows) is not that one: it trains one
gradient-boosted classifier on the evaluated model's own sorted softmax vectors (members: a D_r subset;
non-members: held-out data) and scores it on a balanced D_f vs held-out set. It is named for what it is,
``population_attack`` ("pop-MIA" in the bench's tables); the metric key stays ``asr`` (bench records, the JSON
under docs/results) and ``attack_success_rate`` (the service's stored population metrics,
worker/audit/population.py) so stored results keep their meaning. The shadow-model attack is
``worker.evaluation.shadow`` (bench only).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.ensemble import GradientBoostingClassifier
from torch import nn

from worker.engine.context import RunContext
from worker.engine.data import TensorSplit
from worker.engine.runtime import Runtime
from worker.engine.training import predict_logits


def _context(ctx_or_runtime: RunContext | Runtime) -> RunContext:
    return ctx_or_runtime if isinstance(ctx_or_runtime, RunContext) else RunContext(runtime=ctx_or_runtime)


class ScoredModel:
    """A model whose logits on an input tensor are computed once: an evaluation reads the same splits many
    times (accuracies, the attacks, the audit). Keyed by the tensor object, which the cache keeps alive."""

    def __init__(self, model: nn.Module, runtime: Runtime) -> None:
        self.model = model.to(runtime.device).eval()
        self._ctx = RunContext(runtime=runtime)
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        hit = self._cache.get(id(x))
        if hit is None or hit[0] is not x:
            hit = (x, predict_logits(self.model, x, self._ctx))
            self._cache[id(x)] = hit
        return hit[1]


Scorable = nn.Module | ScoredModel


def model_logits(model: Scorable, x: torch.Tensor, ctx: RunContext) -> torch.Tensor:
    """``model``'s logits on ``x`` (eval mode), from its cache when it is a :class:`ScoredModel`."""
    return model.logits(x) if isinstance(model, ScoredModel) else predict_logits(model, x, ctx)


def accuracy(model: Scorable, split: TensorSplit, ctx_or_runtime: RunContext | Runtime) -> float:
    """Top-1 accuracy in percent of ``model`` on ``split`` against ``split``'s labels."""
    return _masked_accuracy(model, split, None, _context(ctx_or_runtime))


def _masked_accuracy(
    model: Scorable, split: TensorSplit, mask: torch.Tensor | None, ctx: RunContext
) -> float:
    labels = split.require_labels()
    predictions = model_logits(model, split.x, ctx).argmax(dim=1)
    correct = predictions == labels
    if mask is not None:
        correct = correct[mask]
    if len(correct) == 0:
        raise ValueError("accuracy of an empty split is undefined")
    return 100.0 * float(correct.float().mean())


SATURATED = 0.999


def confidence_profile(
    model: Scorable, split: TensorSplit, ctx_or_runtime: RunContext | Runtime
) -> dict[str, float]:
    """How sure ``model`` is on ``split``, what a confidence-based membership attack reads: the median top
    softmax probability, and the share (percent) of samples whose top probability exceeds 0.999."""
    top = torch.softmax(model_logits(model, split.x, _context(ctx_or_runtime)).float(), dim=1).amax(dim=1)
    return {
        "median_top_probability": float(top.median()),
        "saturated_percent": 100.0 * float((top > SATURATED).float().mean()),
    }


def _sorted_softmax(logits: torch.Tensor) -> np.ndarray:
    """The attack's features: each sample's softmax vector sorted in descending order (label-free)."""
    probs = torch.softmax(logits, dim=1)
    return probs.sort(dim=1, descending=True).values.numpy()


@dataclass(frozen=True)
class MembershipAttack:
    """The two halves of a membership attack's balanced evaluation set (the population attack's or the
    shadow-model attack's), in percent. They say why an ASR moves: whether the forget set looks like members,
    or the never-seen data like non-members."""

    forget_called_member: float  # of the evaluated forget samples, those the attacker calls members
    heldout_called_nonmember: float  # of the evaluated held-out samples, those it calls non-members

    @property
    def asr(self) -> float:
        """The attacker's accuracy on the balanced evaluation set."""
        return (self.forget_called_member + self.heldout_called_nonmember) / 2


def population_attack(
    model: Scorable,
    forget: TensorSplit,
    retain: TensorSplit,
    heldout: TensorSplit,
    seed: int,
    runtime: Runtime,
) -> MembershipAttack:
    """The LAF-style population membership attack (Shen et al. 2024; not Shokri et al.'s shadow-model attack,
    see the module doc); ``.asr`` is the accuracy the paper's tables call ASR, in percent.

    Features: per-sample softmax sorted descending. The held-out set is shuffled and cut in two disjoint
    parts. Attacker training set: members = a random subset of D_r, non-members = the first held-out part, n
    of each with n = min(|D_f|, |D_r|, |held-out| // 2) (so members are downsampled when held-out data is
    short). Attacker: GradientBoostingClassifier(n_estimators=100, random_state=seed). ASR = the attacker's
    accuracy on an evaluation set of D_f labelled member vs the other held-out part labelled non-member,
    balanced by sampling m of each, m = min(|D_f|, size of that part). About 50 means D_f looks like
    never-seen data to the attack; Retrain's ASR is not necessarily 50 ("closer to Retrain is better").
    """
    n_train = min(len(forget), len(retain), len(heldout) // 2)
    n_eval = min(len(forget), len(heldout) - n_train)
    if n_train < 1 or n_eval < 1:
        raise ValueError("the ASR needs a non-empty forget and retain set and at least two held-out samples")
    rng = np.random.default_rng(seed)
    ctx = RunContext(runtime=runtime)
    heldout_order = rng.permutation(len(heldout))

    def features(split: TensorSplit, rows: np.ndarray) -> np.ndarray:
        index = torch.from_numpy(rows)
        if isinstance(model, ScoredModel):  # the whole split's logits are cached (or will be reused)
            return _sorted_softmax(model.logits(split.x)[index])
        return _sorted_softmax(predict_logits(model, split.x[index], ctx))

    members = features(retain, rng.choice(len(retain), n_train, replace=False))
    non_members = features(heldout, heldout_order[:n_train])
    attacker = GradientBoostingClassifier(n_estimators=100, random_state=seed)
    attacker.fit(np.concatenate([members, non_members]), np.r_[np.ones(n_train), np.zeros(n_train)])

    forget_members = features(forget, rng.choice(len(forget), n_eval, replace=False))
    eval_non_members = features(heldout, rng.choice(heldout_order[n_train:], n_eval, replace=False))
    return MembershipAttack(
        forget_called_member=100.0 * float(attacker.predict(forget_members).mean()),
        heldout_called_nonmember=100.0 * float(1 - attacker.predict(eval_non_members).mean()),
    )


# The name this attack had before it was named for what it is.
membership_attack = population_attack


def paper_metrics(
    model: Scorable,
    *,
    train_retain: TensorSplit,
    train_forget: TensorSplit,
    test: TensorSplit,
    forget_classes: set[int] | None,
    asr_seed: int,
    runtime: Runtime,
    attack: MembershipAttack | None = None,
) -> dict[str, float | None]:
    """The paper's table columns in percent: Train_r, Train_f (against ``train_forget``'s labels: for a
    noisy-label setup, the labels the model was trained with), Test, Test_r / Test_f (held-out accuracy on
    classes outside / inside ``forget_classes``; None without forget classes or when the test set has no such
    sample) and ``asr``: the population attack's accuracy (``population_attack``; the key keeps the paper's
    column name). ``attack``: that attack on these splits when the caller has run it already (to keep its
    halves), so it is not fitted twice."""
    if attack is None:
        attack = population_attack(model, train_forget, train_retain, test, seed=asr_seed, runtime=runtime)
    test_r: float | None = None
    test_f: float | None = None
    if forget_classes is not None:
        in_forget = torch.isin(test.require_labels(), torch.tensor(sorted(forget_classes), dtype=torch.long))
        ctx = RunContext(runtime=runtime)
        test_r = _masked_accuracy(model, test, ~in_forget, ctx) if bool((~in_forget).any()) else None
        test_f = _masked_accuracy(model, test, in_forget, ctx) if bool(in_forget.any()) else None
    return {
        "train_r": accuracy(model, train_retain, runtime),
        "train_f": accuracy(model, train_forget, runtime),
        "test": accuracy(model, test, runtime),
        "test_r": test_r,
        "test_f": test_f,
        "asr": attack.asr,
    }
