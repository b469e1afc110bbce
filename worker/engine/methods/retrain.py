"""Retrain (exact unlearning, the gold standard): a fresh model trained from scratch on D_r (paper A.3).

Retrain's randomness has its own stream. A caller typically seeds the original model with its run's seed
(``torch.manual_seed(seed)`` then ``build_model``, as the bench and the demo do) and passes the same seed in
``config.seed``; seeding Retrain's fresh model with that seed again would start it from the original model's
exact initial weights (and shuffle D_r with the original's batch-order stream), so "retrained" would share
the original's initialisation instead of being an independent draw. Retrain therefore derives its seed as
``retrain_seed(config.seed)``: the first 64 bits of ``numpy.random.SeedSequence(config.seed,
spawn_key=(RETRAIN_SPAWN_KEY,))`` (a spawned child of the run's seed, as ``SeedSequence.spawn`` makes),
masked to 63 bits. It seeds both the initial weights and the ``RunContext`` of the training loop (batch
order).
Deterministic for a given ``config.seed``; distinct from the stream of every plain integer seed, so also from
``config.seed + 1`` (the next bench seed's original model).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from worker.engine.config import RetrainConfig, TrainingConfig
from worker.engine.context import RunContext
from worker.engine.data import TensorSplit
from worker.engine.models import build_model
from worker.engine.spec import ModelSpec
from worker.engine.training import train

# A fixed spawn key: SeedSequence(seed, spawn_key=(key,)) is the child stream ``key`` of ``seed``. Changing it
# changes every Retrain result, so it is a constant, not a setting.
RETRAIN_SPAWN_KEY = 0x5E7A1


def retrain_seed(seed: int) -> int:
    """Retrain's own seed for run seed ``seed`` (module docstring): deterministic, 63 bits."""
    state = np.random.SeedSequence(seed, spawn_key=(RETRAIN_SPAWN_KEY,)).generate_state(1, np.uint64)
    return int(state[0]) & (2**63 - 1)


def fresh_model(spec: ModelSpec, seed: int) -> nn.Module:
    """Retrain's untrained model for run seed ``seed``, built under ``retrain_seed(seed)`` without touching
    the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(retrain_seed(seed))
        return build_model(spec)


def run(
    model: nn.Module,
    spec: ModelSpec,
    forget: TensorSplit,
    retain: TensorSplit,
    config: RetrainConfig,
    ctx: RunContext,
) -> nn.Module:
    """Ignores ``model``'s weights and ``forget``'s samples; only the architecture (``spec``) carries over."""
    forget.require_labels()  # label-aware (config.METHODS): refuse unlabelled requests like the others
    fresh = fresh_model(spec, config.seed).to(ctx.runtime.device)
    training = TrainingConfig(epochs=config.epochs, lr=config.lr, batch_size=config.batch_size)
    own = dataclasses.replace(ctx, seed=retrain_seed(config.seed))
    return train(fresh, retain, training, own, batchnorm=config.batchnorm)
