"""The bench's method names: the engine's methods, ``original`` (the untouched initial model) and the Table 3
ablation aliases. Torch-free, so the CLI can validate a command before loading the engine."""

from __future__ import annotations

import dataclasses
from typing import Any

from worker.engine.config import (
    METHODS,
    RENAMED_METHODS,
    ConfigError,
    TrainingConfig,
    UnlearnConfig,
    checked_config,
    make_config,
    renamed_message,
)

ORIGINAL = "original"
# The --set prefix that configures the initial model's training.
INITIAL = "initial"
# Paper A.2: the MNIST CNN's initial model trains 10 epochs at lr 1e-3, batch 32.
INITIAL_TRAINING = TrainingConfig(epochs=10, lr=1e-3, batch_size=32)

# Paper Table 3 ablates the label-agnostic MixUnlearn; these are bench-only names, not engine methods.
ABLATION_BASE = "mixunlearn-agnostic"
ABLATIONS: dict[str, dict[str, Any]] = {
    "mixunlearn-no-mixblock": {"use_mixblock": False},
    "mixunlearn-no-real": {"use_real_loss": False},
    "mixunlearn-no-mix": {"use_mix_loss": False},
    "mixunlearn-no-sharpen": {"use_sharpen": False},
}

DEFAULT_METHODS: tuple[str, ...] = (ORIGINAL, *METHODS)
KNOWN_METHODS: tuple[str, ...] = (*DEFAULT_METHODS, *ABLATIONS)


def engine_method(name: str) -> str:
    """The engine method a bench name runs (``original`` runs none and is not accepted here)."""
    if name in ABLATIONS:
        return ABLATION_BASE
    if name in METHODS:
        return name
    if name in RENAMED_METHODS:
        raise ConfigError(renamed_message(name))
    raise ConfigError(f"unknown method {name!r}; known: {', '.join(KNOWN_METHODS)}")


def is_label_aware(name: str) -> bool:
    return name == ORIGINAL or METHODS[engine_method(name)].label_aware


def method_config(name: str, overrides: dict[str, Any], seed: int) -> UnlearnConfig:
    """The engine config of bench method ``name``: preset, then ablation switches, then ``--set`` overrides;
    the seed always comes from the bench's seed loop."""
    return make_config(engine_method(name), {**ABLATIONS.get(name, {}), **overrides, "seed": seed})


def initial_training_config(overrides: dict[str, Any]) -> TrainingConfig:
    values = {**dataclasses.asdict(INITIAL_TRAINING), **overrides}
    return checked_config(TrainingConfig, values, owner=INITIAL)
