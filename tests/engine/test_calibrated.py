"""Calibrated forgetting (``calibrated``): its targets are required, it matches only the samples scored above
them, and on digits with memorised wrong labels it lands where an exact retrain does: the wrong labels gone,
the clean samples not pushed below what a model that never saw them gives."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.engine.test_repair import RECIPE, SPEC, WRONG, Memorised
from worker.engine.api import treatment, unlearn
from worker.engine.config import ConfigError, TrainingConfig, make_config
from worker.engine.context import RunContext
from worker.engine.data import TensorSplit
from worker.engine.methods._loops import steps_over_retain
from worker.engine.methods.calibrated import matching_loss, step_floor, with_retrain_budget
from worker.engine.models import build_model
from worker.engine.scores import stable_logit
from worker.engine.training import predict_logits, train


@pytest.fixture(scope="module")
def memorised() -> Memorised:
    """900 digits: the forget set is 3 % of the training data, about a subject's share of mnist5k's."""
    return Memorised(rows=900)


def _retrain(memorised: Memorised, seed: int) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(SPEC)
    return train(model, memorised.retain, RECIPE, RunContext(seed=seed))


@pytest.fixture(scope="module")
def retrained(memorised: Memorised) -> torch.nn.Module:
    """An exact retrain on the kept data: its scores on the forgotten samples are the targets a steering
    reference that never saw them would give (what the service's steering references estimate)."""
    return _retrain(memorised, 1)


def _phi(model: torch.nn.Module, split: TensorSplit) -> torch.Tensor:
    return stable_logit(predict_logits(model, split.x, RunContext()), split.require_labels()).float()


def test_only_the_matched_samples_cost_from_both_sides_and_linearly_far_off() -> None:
    phi = torch.tensor([3.0, -1.0, 2.0, 1.5], dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([1.0, 0.0, 4.0, 1.0], dtype=torch.float64)
    loss = matching_loss(phi, targets, torch.tensor([True, False, True, True]))
    loss.backward()
    # Gaps 2, (unmatched), -2, 0.5: linear beyond one unit (2 |gap| - 1), squared within it (gap^2).
    assert float(loss.detach()) == pytest.approx((3.0 + 0.0 + 3.0 + 0.25) / 4)
    # The first is pulled down, the third (matched, below its target) back up, the second left alone.
    assert phi.grad is not None and phi.grad.tolist() == pytest.approx([0.5, 0.0, -0.5, 0.25])


def test_refuses_without_targets(memorised: Memorised) -> None:
    with pytest.raises(ValueError, match="steering targets"):
        unlearn(memorised.model, SPEC, memorised.forget, memorised.retain, make_config("calibrated"))


def test_targets_must_match_the_rows() -> None:
    with pytest.raises(ValueError, match="targets must have shape"):
        TensorSplit(torch.zeros(3, 1, 8, 8), torch.zeros(3, dtype=torch.long), targets=torch.zeros(2))


def test_config_ranges() -> None:
    with pytest.raises(ConfigError, match=r"calibrated\.pull"):
        make_config("calibrated", {"pull": -1.0})
    with pytest.raises(ConfigError, match=r"calibrated\.forget_batch"):
        make_config("calibrated", {"forget_batch": 0})
    with pytest.raises(ConfigError, match=r"calibrated\.max_class_share must be in \[0, 1\]"):
        make_config("calibrated", {"max_class_share": 1.5})


def test_forgets_the_memorised_labels_without_over_forgetting(
    memorised: Memorised, retrained: torch.nn.Module
) -> None:
    forget = dataclasses.replace(memorised.forget, targets=_phi(retrained, memorised.forget).double())
    config = make_config("calibrated", {"seed": 3})
    calibrated = unlearn(memorised.model, SPEC, forget, memorised.retain, config)
    again = unlearn(memorised.model, SPEC, forget, memorised.retain, config)
    pairs = zip(calibrated.state_dict().values(), again.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)

    # The base model predicts its memorised wrong labels; the calibrated version no more than the retrain.
    assert memorised.wrong_labels_predicted(memorised.model) > 0.5
    assert memorised.wrong_labels_predicted(calibrated) <= memorised.wrong_labels_predicted(retrained) + 0.1
    # The wrong labels' scores come down to the retrain's. The clean forgotten samples are not pushed further
    # below it than another retrain's scores differ from it (the targets' own spread).
    phi, target = _phi(calibrated, memorised.forget), forget.targets
    assert target is not None
    spread = float((_phi(_retrain(memorised, 2), memorised.forget) - target).abs().mean())
    assert float((phi[:WRONG] - target[:WRONG]).mean()) < spread
    assert float((phi[WRONG:] - target[WRONG:]).mean()) > -spread
    # Utility: on this toy (a base model trained at lr 3e-3, its wrong labels 20+ units of phi above their
    # targets) the version loses about 6 points of test accuracy, which the audit's utility rule would refuse
    # (the request then falls back to a retrain); on the calibration protocols it refused none
    # (docs/audit.md). Bounded here so that a change that makes it worse is seen.
    assert memorised.test_accuracy(calibrated) >= memorised.test_accuracy(memorised.model) - 0.08


def test_a_forget_set_holding_much_of_a_class_gets_repairs_treatment(memorised: Memorised) -> None:
    """Per-sample targets stand for a retrain only while the forget set is a small share of each class: past
    ``max_class_share`` of one class the method runs repair's treatment, and says so."""
    labels = torch.cat([memorised.forget.require_labels(), memorised.retain.require_labels()])
    x = torch.cat([memorised.forget.x, memorised.retain.x])
    zeros = torch.nonzero(labels == 0).flatten()
    rest = torch.nonzero(labels != 0).flatten()
    half = len(zeros) // 2
    forget = TensorSplit(x[zeros[:half]], labels[zeros[:half]])  # half of class 0, no targets needed
    retain = TensorSplit(x[torch.cat([zeros[half:], rest])], labels[torch.cat([zeros[half:], rest])])
    config = make_config("calibrated", {"seed": 3, "min_steps": 5})
    chosen = treatment(forget, retain, config)
    assert chosen is not None and chosen["name"] == "repair"
    assert chosen["largest_class_share"] == {"class": 0, "share": pytest.approx(half / len(zeros), abs=1e-4),
                                             "limit": 0.2}  # fmt: skip
    assert "class 0" in chosen["why"]
    routed = unlearn(memorised.model, SPEC, forget, retain, config)
    repaired = unlearn(memorised.model, SPEC, forget, retain, make_config("repair", {"seed": 3}))
    routed_state, repaired_state = routed.state_dict(), repaired.state_dict()
    assert routed_state.keys() == repaired_state.keys()
    assert all(torch.equal(routed_state[name], repaired_state[name]) for name in routed_state)

    # A subject's share (the fixture's 30 samples of 900, at most a few of each class) is matched.
    subject = treatment(memorised.forget, memorised.retain, config)
    assert subject is not None and subject["name"] == "matching" and subject["why"] is None
    assert subject["largest_class_share"]["share"] <= 0.2
    assert treatment(forget, retain, make_config("repair", {})) is None  # repair always does one thing


def test_its_step_budget_is_a_share_of_a_retrain_with_the_models_recipe() -> None:
    """Where the caller knows the model's recipe (the job does), calibrated runs at most max_retrain_share
    of a retrain's steps, never less than one pass over D_r; without it, min_steps."""
    config = make_config("calibrated", {})
    assert step_floor(config) == config.min_steps == 100
    small = with_retrain_budget(config, TrainingConfig(epochs=20, batch_size=32), retained=1208)
    assert small.retrain_steps == 20 * 38 and step_floor(small) == 61  # ceil(0.08 * 760)
    assert steps_over_retain(1208, small.epochs, small.batch_size, step_floor(small)) == 61
    large = with_retrain_budget(config, TrainingConfig(epochs=20, batch_size=32), retained=3950)
    assert step_floor(large) == 100  # 8 % of 2,480 steps is more than the floor: unchanged
    given = make_config("calibrated", {"retrain_steps": 50})
    assert with_retrain_budget(given, TrainingConfig(), retained=10_000) is given  # the caller's stands
    with pytest.raises(ConfigError, match=r"calibrated\.max_retrain_share must be in \[0, 1\]"):
        make_config("calibrated", {"max_retrain_share": 2.0})
