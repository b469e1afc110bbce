"""Shokri et al. (2017)'s shadow-model membership attack: the attack the MixUnlearn paper cites for its ASR
column, computed beside the LAF-style population attack (``worker.evaluation.metrics.population_attack``),
which is what the engine, the service and the paper's lineage actually report as "ASR".

Computed by the bench only. The attacker knows the target's architecture and training recipe and holds data
from the same distribution that the target never saw:

- Shadow data: never-seen (held-out) rows only, disjoint from the target's training set. The held-out set is
  shuffled (seeded) and cut in two halves: the shadow pool, and the evaluation part, which no shadow model
  and no attack classifier ever sees.
- Shadow models: ``num_shadows`` models, each trained by ``train_shadow`` (the bench: a fresh model of the
  target's architecture, the initial model's recipe, its own seed stream) on a random half of the pool
  ("in"); the other half of the pool is its "out".
- Attack classifiers: one per class, as in Shokri et al. (Sec. V): trained on the shadow models' full softmax
  vectors of the pool records of that class, labelled in (1) / out (0); gradient-boosted trees (100), like
  the population attack (Shokri et al. use small neural networks). A class without both in and out records
  falls back to one classifier fitted on every class's records.
- ASR: the attack's accuracy on a balanced evaluation set, m forget samples labelled member vs m rows of the
  evaluation part labelled non-member (m = min(|D_f|, size of that part)), each record routed to the
  classifier of its label; the same two halves (``MembershipAttack``) as the population attack. As there,
  "closer to Retrain is better": Retrain's is not necessarily 50.

The shadows and the classifiers do not depend on the evaluated model: the bench fits them once per seed and
scores every method's model with the same ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.ensemble import GradientBoostingClassifier

from worker.engine.context import RunContext
from worker.engine.data import TensorSplit
from worker.engine.runtime import Runtime
from worker.evaluation.metrics import MembershipAttack, Scorable, model_logits

# (training data, shadow index) -> the trained shadow model.
ShadowTrainer = Callable[[TensorSplit, int], Scorable]

# SeedSequence spawn key of the shadow models' streams (see ``shadow_seed``).
SHADOW_SPAWN_KEY = 0x5AD0


def shadow_seed(seed: int, index: int) -> int:
    """Shadow model ``index``'s own seed for run seed ``seed``: the first 64 bits (masked to 63) of
    ``SeedSequence(seed, spawn_key=(SHADOW_SPAWN_KEY, index))``, distinct from the run's seed, from every
    other shadow's and from Retrain's stream."""
    state = np.random.SeedSequence(seed, spawn_key=(SHADOW_SPAWN_KEY, index)).generate_state(1, np.uint64)
    return int(state[0]) & (2**63 - 1)


def _softmax(model: Scorable, x: torch.Tensor, runtime: Runtime) -> np.ndarray:
    return torch.softmax(model_logits(model, x, RunContext(runtime=runtime)), dim=1).numpy()


@dataclass(frozen=True)
class ShadowAttack:
    """The fitted attack: per-class classifiers (``fallback`` for classes the shadows did not cover) and the
    held-out rows kept for evaluation."""

    classifiers: dict[int, GradientBoostingClassifier]
    fallback: GradientBoostingClassifier
    eval_rows: np.ndarray  # rows of the held-out split no shadow model trained or was tested on
    num_shadows: int
    seed: int

    def predict(self, probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """1 (member) / 0 per record, each scored by its label's classifier."""
        out = np.empty(len(labels))
        for label in np.unique(labels):
            rows = labels == label
            out[rows] = self.classifiers.get(int(label), self.fallback).predict(probs[rows])
        return out

    def evaluate(
        self, model: Scorable, forget: TensorSplit, heldout: TensorSplit, runtime: Runtime
    ) -> MembershipAttack:
        """The attack on ``model``: D_f (members) vs the evaluation part of ``heldout`` (the split it was
        fitted with), m of each, drawn from the attack's seed so every model is scored on the same rows."""
        if len(forget) == 0:
            raise ValueError("the shadow-model attack needs a non-empty forget set")
        m = min(len(forget), len(self.eval_rows))
        rng = np.random.default_rng(self.seed)
        forget_rows = torch.from_numpy(rng.choice(len(forget), m, replace=False))
        eval_rows = torch.from_numpy(rng.choice(self.eval_rows, m, replace=False))
        forget_probs = _softmax(model, forget.x, runtime)[forget_rows.numpy()]
        heldout_probs = _softmax(model, heldout.x, runtime)[eval_rows.numpy()]
        members = self.predict(forget_probs, forget.require_labels()[forget_rows].numpy())
        non_members = self.predict(heldout_probs, heldout.require_labels()[eval_rows].numpy())
        return MembershipAttack(
            forget_called_member=100.0 * float(members.mean()),
            heldout_called_nonmember=100.0 * float(1 - non_members.mean()),
        )


def fit_shadow_attack(
    heldout: TensorSplit,
    train_shadow: ShadowTrainer,
    *,
    num_shadows: int,
    seed: int,
    runtime: Runtime,
) -> ShadowAttack:
    """Train ``num_shadows`` shadow models on halves of the shadow pool and fit the attack (module doc)."""
    if num_shadows < 1:
        raise ValueError(f"the shadow-model attack needs at least one shadow model, got {num_shadows}")
    labels = heldout.require_labels().numpy()
    if len(heldout) < 4:
        raise ValueError("the shadow-model attack needs at least four held-out samples")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(heldout))
    pool, eval_rows = np.sort(order[: len(order) // 2]), np.sort(order[len(order) // 2 :])
    pool_x, pool_y = heldout.x[torch.from_numpy(pool)], labels[pool]
    features, members, classes = [], [], []
    for index in range(num_shadows):
        inside = np.zeros(len(pool), dtype=bool)
        inside[rng.choice(len(pool), len(pool) // 2, replace=False)] = True
        trained_on = torch.from_numpy(np.flatnonzero(inside))
        shadow = train_shadow(TensorSplit(pool_x[trained_on], torch.from_numpy(pool_y)[trained_on]), index)
        features.append(_softmax(shadow, pool_x, runtime))
        members.append(inside.astype(np.float64))
        classes.append(pool_y)
    x, y, c = np.concatenate(features), np.concatenate(members), np.concatenate(classes)

    def fitted(rows: np.ndarray) -> GradientBoostingClassifier:
        return GradientBoostingClassifier(n_estimators=100, random_state=seed).fit(x[rows], y[rows])

    classifiers: dict[int, GradientBoostingClassifier] = {}
    for label in np.unique(c):
        rows = np.flatnonzero(c == label)
        if len(np.unique(y[rows])) == 2:  # both in and out records of this class
            classifiers[int(label)] = fitted(rows)
    return ShadowAttack(classifiers, fitted(np.arange(len(y))), eval_rows, num_shadows, seed)
