"""Method configs arrive as JSON from product backends: every field's type and range is checked before a job
is queued, so a worker never starts on a value it cannot use."""

from __future__ import annotations

from typing import Any

import pytest

from worker.engine.config import METHODS, ConfigError, config_to_dict, make_config


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_accepts_its_own_defaults_back(method: str) -> None:
    config = make_config(method)
    assert make_config(method, config_to_dict(config)) == config


@pytest.mark.parametrize(
    ("method", "overrides", "message"),
    [
        ("mixunlearn", {"learning_rate": 1e-3}, "unknown config field(s) for mixunlearn: learning_rate"),
        ("mixunlearn", {"seed": "7"}, "mixunlearn.seed must be an integer"),
        ("mixunlearn", {"epochs": 2.5}, "mixunlearn.epochs must be an integer"),
        ("mixunlearn", {"epochs": True}, "mixunlearn.epochs must be an integer"),
        ("mixunlearn", {"epochs": 0}, "mixunlearn.epochs must be > 0"),
        ("mixunlearn", {"lr": "fast"}, "mixunlearn.lr must be a finite number"),
        ("mixunlearn", {"lr": float("inf")}, "mixunlearn.lr must be a finite number"),
        ("mixunlearn", {"lr": float("nan")}, "mixunlearn.lr must be a finite number"),
        ("mixunlearn", {"lr": -1e-3}, "mixunlearn.lr must be > 0"),
        ("mixunlearn", {"omega": -1}, "mixunlearn.omega must be >= 0"),
        ("mixunlearn", {"use_sharpen": "yes"}, "mixunlearn.use_sharpen must be true or false"),
        ("mixunlearn", {"batchnorm": "frozen"}, "mixunlearn.batchnorm must be one of 'eval', 'train'"),
        ("mixunlearn", {"seed": 2**64}, "mixunlearn.seed must be at most"),
        ("mixunlearn", {"use_mix_loss": False, "use_real_loss": False}, "cannot both be off"),
        ("ugradsl", {"p": 1.5}, "ugradsl.p must be in [0, 1]"),
        ("ugradsl", {"smoothing": 0.9}, "ugradsl.smoothing must be < 0"),
        ("ugradsl", {"smoothing": 1.5}, "ugradsl.smoothing must be < 0"),
        ("ugradsl", {"loop_over": "retain"}, "ugradsl.loop_over defines the method and cannot be set"),
        ("ugradsl-plus", {"loop_over": "forget"}, "ugradsl-plus.loop_over defines the method"),
        ("mixunlearn-agnostic", {"label_agnostic": False}, "mixunlearn-agnostic.label_agnostic defines"),
        ("mixunlearn", {"label_agnostic": True}, "mixunlearn.label_agnostic defines the method"),
        ("ugradsl", {"loop_over": "both"}, "ugradsl.loop_over defines the method"),
        ("retrain", {"batch_size": [32]}, "retrain.batch_size must be an integer"),
        ("ugradsl", {"distance_threshold": 1.5}, "ugradsl.distance_threshold must be in [0, 1]"),
        ("ugradsl", {"distance_threshold": "median"}, "must be a finite number, got 'median' (or null"),
        ("lmix", {}, "method 'lmix' was renamed 'randlabel-mixup'"),
    ],
)
def test_bad_values_are_named(method: str, overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        make_config(method, overrides)
    assert message in str(raised.value)


def test_a_methods_own_defining_value_is_accepted_back() -> None:
    assert make_config("mixunlearn-agnostic", {"label_agnostic": True}).label_agnostic  # type: ignore[attr-defined]
    assert make_config("ugradsl-plus", {"loop_over": "retain"}).loop_over == "retain"  # type: ignore[attr-defined]


def test_integers_are_accepted_for_float_fields() -> None:
    assert make_config("mixunlearn", {"lr": 1, "omega": 0}).lr == 1


def test_the_old_lmix_name_is_refused_with_the_new_one() -> None:
    with pytest.raises(ConfigError) as raised:
        make_config("lmix", {"alpha": 0.75})
    message = str(raised.value)
    assert "use 'randlabel-mixup'" in message and "not the paper's L-Mix" in message
    assert "lmix" not in METHODS and make_config("randlabel-mixup").alpha == 0.75  # type: ignore[attr-defined]


def test_ugradsl_threshold_takes_null_for_the_median_or_a_distance() -> None:
    assert make_config("ugradsl", {"distance_threshold": None}).distance_threshold is None  # type: ignore[attr-defined]
    assert make_config("ugradsl", {"distance_threshold": 0}).distance_threshold == 0  # type: ignore[attr-defined]
    # A stored configuration from before the change (a fixed 0.5) is still accepted.
    assert make_config("ugradsl-plus", {"distance_threshold": 0.5, "adaptive": True}).adaptive  # type: ignore[attr-defined]
