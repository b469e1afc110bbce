"""The baseline methods (Retrain, Fine-tune, NegGrad, RandLabel, randlabel-mixup, UGradSL/UGradSL+) behind
``unlearn``, on sklearn's 8x8 digits with the MNIST CNN architecture."""

from __future__ import annotations

import copy

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

from worker.engine.api import unlearn
from worker.engine.config import TrainingConfig, UnlearnConfig, make_config
from worker.engine.context import RunContext
from worker.engine.data import TensorSplit
from worker.engine.methods.ugradsl import (
    adaptive_smoothing,
    cosine_distances,
    median,
    smoothed_cross_entropy,
)
from worker.engine.models import build_model, known_architectures
from worker.engine.progress import CancellationToken, ProgressEvent, UnlearningCancelled
from worker.engine.runtime import Runtime
from worker.engine.spec import BUILTIN_ARCHITECTURES, ModelSpec, mnist_cnn_spec, resnet18_spec
from worker.engine.training import train
from worker.evaluation import accuracy

SPEC = mnist_cnn_spec(10, (1, 8, 8))
BASELINES = ("retrain", "finetune", "neggrad", "randlabel", "randlabel-mixup", "ugradsl", "ugradsl-plus")
LABEL_AGNOSTIC = ("randlabel", "randlabel-mixup")
# Tiny runs: one epoch over 40 forget samples (or, for Retrain / Fine-tune / UGradSL+, over the 200 retained).
SMALL = {"epochs": 1, "batch_size": 20}


class Digits:
    def __init__(self) -> None:
        data = load_digits()
        x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(data.target, dtype=torch.long)
        train_rows, test_rows = torch.arange(0, 1400), torch.arange(1400, len(y))
        self.train = TensorSplit(x[train_rows], y[train_rows])
        self.test = TensorSplit(x[test_rows], y[test_rows])
        train_y = self.train.require_labels()
        zeros, others = torch.nonzero(train_y == 0).flatten(), torch.nonzero(train_y != 0).flatten()
        self.forget = self.train.subset(zeros[:40])  # class-level forgetting of digit 0
        self.retain = self.train.subset(others[:200])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = build_model(SPEC)
        self.model = train(model, self.train, TrainingConfig(epochs=4, lr=3e-3, batch_size=64), RunContext())


@pytest.fixture(scope="module")
def digits() -> Digits:
    return Digits()


def _config(method: str, **overrides: object) -> UnlearnConfig:
    return make_config(method, {**SMALL, **overrides})


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_initial_model_learns_digits(digits: Digits) -> None:
    assert accuracy(digits.model, digits.test, RunContext()) > 80.0


@pytest.mark.parametrize("method", BASELINES)
def test_method_contract(digits: Digits, method: str) -> None:
    """Same architecture out, input untouched, identical weights under a seed, monotone progress."""
    before = _state(digits.model)
    events: list[ProgressEvent] = []
    first = unlearn(digits.model, SPEC, digits.forget, digits.retain, _config(method), progress=events.append)
    second = unlearn(digits.model, SPEC, digits.forget, digits.retain, _config(method))
    assert _same(_state(digits.model), before)
    assert type(first) is type(digits.model) and not first.training
    assert {k: v.shape for k, v in first.state_dict().items()} == {k: v.shape for k, v in before.items()}
    assert _same(_state(first), _state(second))
    assert not _same(_state(first), before)
    other_seed = unlearn(digits.model, SPEC, digits.forget, digits.retain, _config(method, seed=1))
    assert not _same(_state(first), _state(other_seed))
    steps = [e.step for e in events]
    assert steps == list(range(1, len(steps) + 1)) and steps[-1] == events[0].total_steps
    looped = digits.forget if method not in ("retrain", "finetune", "ugradsl-plus") else digits.retain
    assert events[0].total_steps == -(-len(looped) // SMALL["batch_size"])
    assert all(e.epoch == 1 and e.total_epochs == 1 for e in events)
    assert all(isinstance(v, float) for e in events for v in e.losses.values()) and events[0].losses


@pytest.mark.parametrize("method", LABEL_AGNOSTIC)
def test_label_agnostic_methods_never_read_labels(digits: Digits, method: str) -> None:
    forget, retain = TensorSplit(digits.forget.x), TensorSplit(digits.retain.x)
    without = unlearn(digits.model, SPEC, forget, retain, _config(method))
    with_labels = unlearn(digits.model, SPEC, digits.forget, digits.retain, _config(method))
    assert _same(_state(without), _state(with_labels))


@pytest.mark.parametrize("method", sorted(set(BASELINES) - set(LABEL_AGNOSTIC)))
def test_label_aware_methods_refuse_unlabelled_data(digits: Digits, method: str) -> None:
    with pytest.raises(ValueError, match="label-aware"):
        unlearn(digits.model, SPEC, TensorSplit(digits.forget.x), digits.retain, _config(method))


@pytest.mark.parametrize("method", ["neggrad", "randlabel-mixup", "ugradsl-plus", "retrain"])
def test_cancellation_raises_and_leaves_model(digits: Digits, method: str) -> None:
    token = CancellationToken()
    seen: list[ProgressEvent] = []

    def progress(event: ProgressEvent) -> None:
        seen.append(event)
        token.cancel()

    before = _state(digits.model)
    with pytest.raises(UnlearningCancelled):
        unlearn(digits.model, SPEC, digits.forget, digits.retain, _config(method), progress, token)
    assert len(seen) == 1 and _same(_state(digits.model), before)


@pytest.mark.parametrize("method", ["finetune", "ugradsl"])
def test_batchnorm_statistics_follow_config(method: str) -> None:
    spec = resnet18_spec(10, (1, 8, 8))
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 1, 8, 8, generator=generator), torch.randint(10, (24,), generator=generator)
    forget, retain = TensorSplit(x[:8], y[:8]), TensorSplit(x[8:], y[8:])
    model = build_model(spec).eval()
    stats = {k: v for k, v in _state(model).items() if "running" in k}
    for mode, changed in (("eval", False), ("train", True)):
        config = make_config(method, {"epochs": 1, "batch_size": 8, "batchnorm": mode})
        after = unlearn(model, spec, forget, retain, config).state_dict()
        assert _same({k: after[k] for k in stats}, stats) is not changed


def test_neggrad_lowers_forget_accuracy(digits: Digits) -> None:
    ctx = RunContext()
    config = make_config("neggrad", {"epochs": 5, "batch_size": 20, "lr": 3e-4})
    before = accuracy(digits.model, digits.forget, ctx)
    after_model = unlearn(digits.model, SPEC, digits.forget, digits.retain, config)
    assert before > 90.0 and accuracy(after_model, digits.forget, ctx) < before - 40.0
    assert accuracy(after_model, digits.retain, ctx) > 70.0


def test_retrain_ignores_input_weights_and_global_rng(digits: Digits) -> None:
    scrambled = copy.deepcopy(digits.model)
    with torch.no_grad():
        for p in scrambled.parameters():
            p.mul_(-2.0)
    rng_before = torch.random.get_rng_state()
    a = unlearn(digits.model, SPEC, digits.forget, digits.retain, _config("retrain"))
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    b = unlearn(scrambled, SPEC, digits.forget, digits.retain, _config("retrain"))
    assert _same(_state(a), _state(b))


@pytest.mark.parametrize("threshold", [None, 0.25])
def test_adaptive_ugradsl_runs_and_reports_its_rate(digits: Digits, threshold: float | None) -> None:
    events: list[ProgressEvent] = []
    config = _config("ugradsl", adaptive=True, distance_threshold=threshold)
    unlearn(digits.model, SPEC, digits.forget, digits.retain, config, progress=events.append)
    assert all(-0.5 <= e.losses["smoothing"] <= 0.0 for e in events)


def test_adaptive_ugradsl_defaults_to_the_median_threshold() -> None:
    config = make_config("ugradsl", {"adaptive": True})
    assert config.distance_threshold is None  # type: ignore[attr-defined]


# Forget features f1 = (1, 0), f2 = (0, 1); retain r1 = (1, 0), r2 = (3, 1), r3 = (2, 1), r4 = (-1, -1).
# cos(f1, r) = 1, 3/sqrt(10), 2/sqrt(5), -1/sqrt(2); cos(f2, r) = 0, 1/sqrt(10), 1/sqrt(5), -1/sqrt(2).
_F = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
_R = torch.tensor([[1.0, 0.0], [3.0, 1.0], [2.0, 1.0], [-1.0, -1.0]])


def test_ugradsl_distance_is_the_papers_rescaled_cosine_distance() -> None:
    cos = torch.tensor([[1, 3 / 10**0.5, 2 / 5**0.5, -(2**-0.5)], [0, 1 / 10**0.5, 1 / 5**0.5, -(2**-0.5)]])
    # D.4's code: cos_dist = (1 - cos_sim) / 2, in [0, 1]; e.g. d(f1, r2) = 0.02566, d(f2, r4) = 0.85355.
    assert torch.allclose(cosine_distances(_F, _R), (1 - cos) / 2)
    assert cosine_distances(_F, _R)[0, 1].item() == pytest.approx(0.025658, abs=1e-6)
    assert cosine_distances(_F, _R)[1, 3].item() == pytest.approx(0.853553, abs=1e-6)


def test_adaptive_rate_with_the_median_threshold_by_hand() -> None:
    # The eight distances, sorted: 0, 0.0257, 0.0528, 0.2764, 0.3419, 0.5, 0.8536, 0.8536. Their median is
    # the mean of the 4th and 5th, (0.2764 + 0.3419) / 2 = 0.3091 (D.5: beta = median of all pairwise
    # distances). Close to f1: r1, r2, r3 (c = 3); close to f2: r3 only (d = 0.2764; c = 1).
    # a_j = smoothing * c_j / |B| with |B| = 4.
    expected = ((1 - 5**-0.5) / 2 + (1 - 10**-0.5) / 2) / 2  # 0.30914
    assert median(cosine_distances(_F, _R)).item() == pytest.approx(expected, abs=1e-6)
    rate = adaptive_smoothing(_F, _R, smoothing=-0.8, threshold=None)
    assert torch.allclose(rate, torch.tensor([-0.8 * 3 / 4, -0.8 * 1 / 4]))
    assert median(torch.tensor([3.0, 1.0, 2.0])).item() == 2.0  # odd count: the middle value


def test_adaptive_rate_with_a_fixed_threshold_by_hand() -> None:
    # beta = 0.1 on (1 - cos) / 2: f1 has r1 (0), r2 (0.0257), r3 (0.0528) below it; f2 none (nearest 0.2764).
    # On 1 - cos (the old formula) r3 would be at 0.1056, above 0.1: this pins the / 2.
    rate = adaptive_smoothing(_F, _R, smoothing=-0.8, threshold=0.1)
    assert torch.allclose(rate, torch.tensor([-0.8 * 3 / 4, 0.0]))
    far = adaptive_smoothing(_F, -_R.abs() - 5, smoothing=-0.8, threshold=0.1)
    assert torch.equal(far, torch.zeros(2))


def test_smoothed_cross_entropy_matches_eq37() -> None:
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    assert torch.allclose(
        smoothed_cross_entropy(logits, labels, torch.tensor(0.0)), F.cross_entropy(logits, labels)
    )
    a, k = -0.5, 4
    per_class = -torch.log_softmax(logits, dim=1)  # l(h, (x, y')) for every y'
    own = per_class.gather(1, labels[:, None]).squeeze(1)
    others = per_class.sum(dim=1) - own
    # Eq. 37 is the GA side, i.e. minus the smoothed CE: -(1 + (1 - K)/K a) l(y) - a/K sum_{y' != y} l(y').
    eq37 = -(1 + (1 - k) / k * a) * own - a / k * others
    assert torch.allclose(-smoothed_cross_entropy(logits, labels, torch.tensor(a)), eq37.mean())


def test_mnist_cnn_spec_for_8x8_images() -> None:
    spec = ModelSpec.from_dict(SPEC.to_dict())
    assert build_model(spec)(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_the_service_lists_the_architectures_the_engine_builds() -> None:
    # The API (torch-free) refuses a model whose architecture is not in BUILTIN_ARCHITECTURES by default.
    assert known_architectures() == sorted(BUILTIN_ARCHITECTURES)


@pytest.mark.parametrize("method", [*BASELINES, "mixunlearn", "mixunlearn-agnostic"])
def test_every_method_runs_under_mixed_precision(digits: Digits, method: str) -> None:
    # The CUDA path's autocast and fp16 grad scaler, exercised on the CPU (no GPU in CI).
    amp = Runtime(torch.device("cpu"), mixed_precision=True)
    mixed = unlearn(digits.model, SPEC, digits.forget, digits.retain, _config(method), runtime=amp)
    full = unlearn(digits.model, SPEC, digits.forget, digits.retain, _config(method))
    assert all(torch.isfinite(p).all() for p in mixed.parameters())
    ctx = RunContext()
    assert abs(accuracy(mixed, digits.test, ctx) - accuracy(full, digits.test, ctx)) < 5.0
