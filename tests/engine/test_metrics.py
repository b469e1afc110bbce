"""Population metrics: accuracy, the lineage's ASR and the paper's metric table."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from worker.engine.context import RunContext
from worker.engine.data import TensorSplit
from worker.engine.models import build_model
from worker.engine.runtime import CPU
from worker.engine.spec import mnist_cnn_spec
from worker.evaluation import accuracy, membership_attack, paper_metrics

SPEC = mnist_cnn_spec(10, (1, 8, 8))


def _random_split(n: int, seed: int) -> TensorSplit:
    generator = torch.Generator().manual_seed(seed)
    return TensorSplit(
        torch.rand(n, 1, 8, 8, generator=generator), torch.randint(10, (n,), generator=generator)
    )


class _PixelClassifier(nn.Module):
    """Predicts class ``round(9 * x[0, 0])`` with confidence ``scale``: a model whose outputs we control."""

    def __init__(self, scale: float = 5.0) -> None:
        super().__init__()
        self.scale = scale
        self.dummy = nn.Linear(1, 1)  # a parameter, so it looks like a trained module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls = torch.round(9 * x[:, 0, 0, 0]).long()
        # Confident on images whose pixel (0, 1) is set: our "members".
        confidence = self.scale * (1 + 3 * x[:, 0, 0, 1])
        return nn.functional.one_hot(cls, 10).float() * confidence[:, None]


def _labelled(x: torch.Tensor) -> TensorSplit:
    return TensorSplit(x, torch.round(9 * x[:, 0, 0, 0]).long())


def test_accuracy_in_percent_with_runtime_or_context() -> None:
    x = torch.rand(50, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    split = _labelled(x)
    model = _PixelClassifier().train()
    assert accuracy(model, split, CPU) == pytest.approx(100.0)
    assert model.training  # eval mode only for the measurement
    wrong = TensorSplit(x, (split.require_labels() + 1) % 10)
    assert accuracy(model, wrong, RunContext()) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="label-aware"):
        accuracy(model, TensorSplit(x), CPU)


def test_asr_is_about_50_on_random_data() -> None:
    torch.manual_seed(0)
    model = build_model(SPEC)
    asr = membership_attack(
        model, _random_split(150, 1), _random_split(300, 2), _random_split(300, 3), seed=0, runtime=CPU
    ).asr
    assert 35.0 <= asr <= 65.0


def test_asr_detects_confident_members_and_is_seeded() -> None:
    generator = torch.Generator().manual_seed(0)
    members = torch.rand(200, 1, 8, 8, generator=generator)
    members[:, 0, 0, 1] = 1.0
    heldout = torch.rand(200, 1, 8, 8, generator=generator)
    heldout[:, 0, 0, 1] = 0.0
    forget, retain, test = _labelled(members[:60]), _labelled(members[60:]), _labelled(heldout)
    attack = membership_attack(_PixelClassifier(), forget, retain, test, seed=3, runtime=CPU)
    assert attack.forget_called_member > 95.0 and attack.heldout_called_nonmember > 95.0
    assert attack.asr > 95.0
    assert membership_attack(_PixelClassifier(), forget, retain, test, seed=3, runtime=CPU) == attack
    # Unlabelled splits are fine: the attack reads outputs only.
    bare_f, bare_r, bare_t = (TensorSplit(s.x) for s in (forget, retain, test))
    assert membership_attack(_PixelClassifier(), bare_f, bare_r, bare_t, seed=3, runtime=CPU) == attack
    with pytest.raises(ValueError, match="held-out"):
        membership_attack(
            _PixelClassifier(), forget, retain, test.subset(torch.arange(1)), seed=0, runtime=CPU
        )


def test_paper_metrics_keys_and_ranges() -> None:
    torch.manual_seed(0)
    model = build_model(SPEC)
    sets = {
        "train_retain": _random_split(120, 1),
        "train_forget": _random_split(40, 2),
        "test": _random_split(120, 3),
    }
    metrics = paper_metrics(model, **sets, forget_classes={0, 1}, asr_seed=0, runtime=CPU)
    assert set(metrics) == {"train_r", "train_f", "test", "test_r", "test_f", "asr"}
    attack = membership_attack(model, sets["train_forget"], sets["train_retain"], sets["test"], 0, CPU)
    assert metrics["asr"] == attack.asr == (attack.forget_called_member + attack.heldout_called_nonmember) / 2
    assert all(v is not None and 0.0 <= v <= 100.0 for v in metrics.values())
    test_y = sets["test"].require_labels()
    in_forget = (test_y <= 1).float().mean().item()
    assert metrics["test"] == pytest.approx(
        in_forget * metrics["test_f"] + (1 - in_forget) * metrics["test_r"]  # type: ignore[operator]
    )
    no_classes = paper_metrics(model, **sets, forget_classes=None, asr_seed=0, runtime=CPU)
    assert no_classes["test_r"] is None and no_classes["test_f"] is None
    assert no_classes["asr"] == metrics["asr"]
