"""Population metrics: accuracy, the two membership attacks (the LAF-style population attack behind the "asr"
key, and Shokri et al.'s shadow-model attack) and the paper's metric table."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from worker.engine.context import RunContext
from worker.engine.data import TensorSplit
from worker.engine.methods.retrain import retrain_seed
from worker.engine.models import build_model
from worker.engine.runtime import CPU
from worker.engine.spec import mnist_cnn_spec
from worker.evaluation import accuracy, membership_attack, paper_metrics, population_attack
from worker.evaluation.metrics import confidence_profile
from worker.evaluation.shadow import fit_shadow_attack, shadow_seed

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
    asr = population_attack(
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
    attack = population_attack(_PixelClassifier(), forget, retain, test, seed=3, runtime=CPU)
    assert attack.forget_called_member > 95.0 and attack.heldout_called_nonmember > 95.0
    assert attack.asr > 95.0
    assert population_attack(_PixelClassifier(), forget, retain, test, seed=3, runtime=CPU) == attack
    # Unlabelled splits are fine: the attack reads outputs only.
    bare_f, bare_r, bare_t = (TensorSplit(s.x) for s in (forget, retain, test))
    assert population_attack(_PixelClassifier(), bare_f, bare_r, bare_t, seed=3, runtime=CPU) == attack
    with pytest.raises(ValueError, match="held-out"):
        population_attack(
            _PixelClassifier(), forget, retain, test.subset(torch.arange(1)), seed=0, runtime=CPU
        )


def test_the_old_attack_name_is_the_population_attack() -> None:
    assert membership_attack is population_attack


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
    attack = population_attack(model, sets["train_forget"], sets["train_retain"], sets["test"], 0, CPU)
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


class _Memoriser(nn.Module):
    """A model that has memorised its training images: confident (logit 8) on their label, diffuse (logit 1)
    on the pixel rule's class for anything else. Shadow models and targets built alike, as Shokri et al.
    assume (same architecture and recipe)."""

    def __init__(self, data: TensorSplit) -> None:
        super().__init__()
        self.dummy = nn.Linear(1, 1)
        self.seen = data.x.flatten(1)
        self.labels = data.require_labels()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        match = (flat[:, None, :] == self.seen[None, :, :]).all(dim=2)  # (N, |seen|)
        known = match.any(dim=1)
        label = torch.where(
            known, self.labels[match.float().argmax(dim=1)], torch.round(9 * x[:, 0, 0, 0]).long()
        )
        return nn.functional.one_hot(label, 10).float() * torch.where(known, 8.0, 1.0)[:, None]


def _shadow_data(seed: int) -> tuple[TensorSplit, TensorSplit, TensorSplit]:
    generator = torch.Generator().manual_seed(seed)
    forget, retain, heldout = (_labelled(torch.rand(n, 1, 8, 8, generator=generator)) for n in (60, 200, 400))
    return forget, retain, heldout


def test_shadow_attack_detects_memorised_members_on_synthetic_data() -> None:
    forget, retain, heldout = _shadow_data(0)
    trained_on: list[tuple[int, torch.Tensor]] = []

    def train_shadow(data: TensorSplit, index: int) -> nn.Module:
        trained_on.append((index, data.x))
        return _Memoriser(data)

    attack = fit_shadow_attack(heldout, train_shadow, num_shadows=3, seed=0, runtime=CPU)
    assert [index for index, _ in trained_on] == [0, 1, 2]
    # Shadows train on half of the held-out pool (half of the held-out set), never on the evaluation part.
    eval_x = heldout.x[torch.from_numpy(attack.eval_rows)].flatten(1)
    assert len(attack.eval_rows) == 200
    for _, x in trained_on:
        assert len(x) == 100 and not (x.flatten(1)[:, None, :] == eval_x[None]).all(dim=2).any()
    labels = torch.cat([forget.require_labels(), retain.require_labels()])
    target = _Memoriser(TensorSplit(torch.cat([forget.x, retain.x]), labels))
    result = attack.evaluate(target, forget, heldout, CPU)
    assert result.forget_called_member > 95.0 and result.heldout_called_nonmember > 95.0
    assert result.asr > 95.0
    # A target that never saw D_f: its forget samples look like never-seen data, ASR about 50.
    unlearned = attack.evaluate(_Memoriser(retain), forget, heldout, CPU)
    assert unlearned.forget_called_member < 5.0 and 45.0 <= unlearned.asr <= 55.0
    # Seeded: the same shadows, classifiers and evaluation rows again.
    again = fit_shadow_attack(heldout, lambda data, _i: _Memoriser(data), num_shadows=3, seed=0, runtime=CPU)
    assert again.evaluate(target, forget, heldout, CPU) == result
    assert np.array_equal(again.eval_rows, attack.eval_rows)


def test_shadow_attack_refuses_what_it_cannot_fit() -> None:
    _, _, heldout = _shadow_data(1)
    with pytest.raises(ValueError, match="at least one shadow model"):
        fit_shadow_attack(heldout, lambda data, _i: _Memoriser(data), num_shadows=0, seed=0, runtime=CPU)
    with pytest.raises(ValueError, match="label-aware"):
        fit_shadow_attack(
            TensorSplit(heldout.x), lambda d, _i: _Memoriser(d), num_shadows=1, seed=0, runtime=CPU
        )


def test_shadow_seeds_are_their_own_streams() -> None:
    seeds = {shadow_seed(0, index) for index in range(8)}
    assert len(seeds) == 8 and not seeds & ({retrain_seed(0)} | set(range(100)))
    assert shadow_seed(0, 1) == shadow_seed(0, 1) != shadow_seed(1, 1)


def test_confidence_profile_reads_the_top_probability() -> None:
    x = torch.zeros(4, 1, 8, 8)
    x[:2, 0, 0, 1] = 1.0  # two "members": confident; two others: not
    profile = confidence_profile(
        _PixelClassifier(scale=3.0), TensorSplit(x, torch.zeros(4, dtype=torch.long)), CPU
    )
    assert profile["saturated_percent"] == pytest.approx(50.0)
    assert 0.5 < profile["median_top_probability"] < 0.999  # torch.median: the lower middle value, 0.69
