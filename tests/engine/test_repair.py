"""Damage then repair (``repair``): the engine contract (deterministic under a seed, its input untouched,
progress) and, on sklearn's digits with memorised wrong labels, forgetting that lands where Retrain's does."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from worker.engine.api import unlearn
from worker.engine.config import ConfigError, TrainingConfig, make_config
from worker.engine.context import RunContext
from worker.engine.data import TensorSplit
from worker.engine.methods.repair import weighted_layers
from worker.engine.models import build_model
from worker.engine.progress import ProgressEvent
from worker.engine.spec import mnist_cnn_spec
from worker.engine.training import predict_logits, train

SPEC = mnist_cnn_spec(10, (1, 8, 8))
RECIPE = TrainingConfig(epochs=30, lr=3e-3, batch_size=32)
WRONG = 15


class Memorised:
    """An initial model trained on ``rows`` digits (300), 15 of them with a wrong label it learnt (the forget
    set is those 15 and 15 clean samples)."""

    def __init__(self, rows: int = 300) -> None:
        data = load_digits()
        x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(data.target, dtype=torch.long)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        rows, test_rows = order[:rows], order[1200:]
        labels = y[rows].clone()
        labels[:WRONG] = (labels[:WRONG] + 1 + torch.arange(WRONG) % 9) % 10
        self.forget = TensorSplit(x[rows[: 2 * WRONG]], labels[: 2 * WRONG])
        self.retain = TensorSplit(x[rows[2 * WRONG :]], labels[2 * WRONG :])
        self.test = TensorSplit(x[test_rows], y[test_rows])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = build_model(SPEC)
        self.model = train(model, TensorSplit(x[rows], labels), RECIPE, RunContext())

    def wrong_labels_predicted(self, model: nn.Module) -> float:
        predicted = predict_logits(model, self.forget.x[:WRONG], RunContext()).argmax(1)
        return float((predicted == self.forget.require_labels()[:WRONG]).float().mean())

    def test_accuracy(self, model: nn.Module) -> float:
        predicted = predict_logits(model, self.test.x, RunContext()).argmax(1)
        return float((predicted == self.test.require_labels()).float().mean())


@pytest.fixture(scope="module")
def memorised() -> Memorised:
    return Memorised()


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_deterministic_under_a_seed_and_never_modifies_its_input(memorised: Memorised) -> None:
    before = _state(memorised.model)
    events: list[ProgressEvent] = []
    config = make_config("repair", {"epochs": 1, "min_steps": 0})
    first = unlearn(memorised.model, SPEC, memorised.forget, memorised.retain, config, events.append)
    second = unlearn(memorised.model, SPEC, memorised.forget, memorised.retain, config)
    other = unlearn(
        memorised.model, SPEC, memorised.forget, memorised.retain,
        make_config("repair", {"epochs": 1, "min_steps": 0, "seed": 1}),
    )  # fmt: skip
    assert _same(_state(memorised.model), before)
    assert _same(_state(first), _state(second)) and not _same(_state(first), _state(other))
    assert not first.training and type(first) is type(memorised.model)
    assert [e.step for e in events] == list(range(1, 10)) and events[-1].total_steps == 9  # 270 / 32
    # The convolutions are fine-tuned, not re-drawn; the fully connected classifier is a new draw.
    conv_before, conv_after = weighted_layers(memorised.model)[0], weighted_layers(first)[0]
    assert torch.allclose(conv_before.weight, conv_after.weight, atol=0.05)
    head_before, head_after = weighted_layers(memorised.model)[-1], weighted_layers(first)[-1]
    assert not torch.allclose(head_before.weight, head_after.weight, atol=0.05)


def test_a_mixunlearn_forget_step_counts_in_the_progress(memorised: Memorised) -> None:
    events: list[ProgressEvent] = []
    config = make_config("repair", {"epochs": 1, "min_steps": 0, "mixunlearn_steps": 2})
    unlearn(memorised.model, SPEC, memorised.forget, memorised.retain, config, events.append)
    # MixUnlearn: 1 pass over the 30 forget samples is 1 step of 32, so 2 passes; then 9 repair steps.
    assert [e.step for e in events] == list(range(1, 12)) and {e.total_steps for e in events} == {11}
    assert set(events[0].losses) >= {"l_mix", "l_real"} and set(events[-1].losses) == {"ce"}


def test_forgets_memorised_labels_where_retraining_does(memorised: Memorised) -> None:
    assert memorised.wrong_labels_predicted(memorised.model) > 0.8
    retrain = make_config("retrain", {"epochs": RECIPE.epochs, "lr": RECIPE.lr})
    retrained = unlearn(memorised.model, SPEC, memorised.forget, memorised.retain, retrain)
    repaired = unlearn(memorised.model, SPEC, memorised.forget, memorised.retain, make_config("repair"))
    assert memorised.wrong_labels_predicted(retrained) < 0.1
    assert memorised.wrong_labels_predicted(repaired) <= memorised.wrong_labels_predicted(retrained) + 0.1
    assert memorised.test_accuracy(repaired) > memorised.test_accuracy(retrained) - 0.03


def test_more_layers_than_the_model_has_is_refused(memorised: Memorised) -> None:
    config = make_config("repair", {"reinit_layers": 6})
    with pytest.raises(ValueError, match="only 5 weighted layers"):
        unlearn(memorised.model, SPEC, memorised.forget, memorised.retain, config)
    with pytest.raises(ConfigError, match=r"repair\.reinit_layers must be >= 0"):
        make_config("repair", {"reinit_layers": -1})


def _kl_from(base: nn.Module, model: nn.Module, x: torch.Tensor) -> float:
    target = torch.log_softmax(predict_logits(base, x, RunContext()), 1)
    log_probs = torch.log_softmax(predict_logits(model, x, RunContext()), 1)
    return float(torch.nn.functional.kl_div(log_probs, target, reduction="batchmean", log_target=True))


def test_distillation_holds_the_repair_to_the_base_model_on_what_it_keeps_and_still_forgets(
    memorised: Memorised,
) -> None:
    plain = unlearn(memorised.model, SPEC, memorised.forget, memorised.retain, make_config("repair"))
    distilled = unlearn(
        memorised.model, SPEC, memorised.forget, memorised.retain, make_config("repair", {"distill": 1.0})
    )
    kept = memorised.retain.x
    assert _kl_from(memorised.model, distilled, kept) < 0.75 * _kl_from(memorised.model, plain, kept)
    # D_f never enters the loss, the base model's view of it included: its wrong labels are not relearnt.
    assert memorised.wrong_labels_predicted(distilled) < 0.2
    with pytest.raises(ConfigError, match=r"repair\.distill must be in \[0, 1\]"):
        make_config("repair", {"distill": 1.5})
