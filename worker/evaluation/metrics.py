"""Population metrics shared by the benchmark and the service worker: accuracies and the lineage's membership
attack (ASR). Percentages (0-100). Everything is computed in eval mode, i.e. with test-time behaviour."""

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


def accuracy(model: nn.Module, split: TensorSplit, ctx_or_runtime: RunContext | Runtime) -> float:
    """Top-1 accuracy in percent of ``model`` on ``split`` against ``split``'s labels."""
    labels = split.require_labels()
    if len(split) == 0:
        raise ValueError("accuracy of an empty split is undefined")
    predictions = predict_logits(model, split.x, _context(ctx_or_runtime)).argmax(dim=1)
    return 100.0 * float((predictions == labels).float().mean())


def _sorted_softmax(model: nn.Module, x: torch.Tensor, ctx: RunContext) -> np.ndarray:
    """The attack's features: each sample's softmax vector sorted in descending order (label-free)."""
    probs = torch.softmax(predict_logits(model, x, ctx), dim=1)
    return probs.sort(dim=1, descending=True).values.numpy()


@dataclass(frozen=True)
class MembershipAttack:
    """The two halves of the ASR's balanced evaluation set, in percent. They say why an ASR moves: whether the
    forget set looks like members, or the never-seen data like non-members."""

    forget_called_member: float  # of the evaluated forget samples, those the attacker calls members
    heldout_called_nonmember: float  # of the evaluated held-out samples, those it calls non-members

    @property
    def asr(self) -> float:
        """The attacker's accuracy on the balanced evaluation set."""
        return (self.forget_called_member + self.heldout_called_nonmember) / 2


def membership_attack(
    model: nn.Module,
    forget: TensorSplit,
    retain: TensorSplit,
    heldout: TensorSplit,
    seed: int,
    runtime: Runtime,
) -> MembershipAttack:
    """The LAF lineage's membership-inference attack (Shen et al. 2024); ``.asr`` is its ASR in percent.

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
        return _sorted_softmax(model, split.x[torch.from_numpy(rows)], ctx)

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


def paper_metrics(
    model: nn.Module,
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
    sample) and ASR. ``attack``: the membership attack on these splits when the caller has run it already
    (to keep its halves), so it is not fitted twice."""
    if attack is None:
        attack = membership_attack(model, train_forget, train_retain, test, seed=asr_seed, runtime=runtime)
    test_r: float | None = None
    test_f: float | None = None
    if forget_classes is not None:
        in_forget = torch.isin(test.require_labels(), torch.tensor(sorted(forget_classes), dtype=torch.long))
        test_r = _subset_accuracy(model, test, ~in_forget, runtime)
        test_f = _subset_accuracy(model, test, in_forget, runtime)
    return {
        "train_r": accuracy(model, train_retain, runtime),
        "train_f": accuracy(model, train_forget, runtime),
        "test": accuracy(model, test, runtime),
        "test_r": test_r,
        "test_f": test_f,
        "asr": attack.asr,
    }


def _subset_accuracy(
    model: nn.Module, split: TensorSplit, mask: torch.Tensor, runtime: Runtime
) -> float | None:
    rows = torch.nonzero(mask).flatten()
    return accuracy(model, split.subset(rows), runtime) if len(rows) else None
