"""The paper's architectures, written with torch alone, and the registry that rebuilds a model from a spec."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from worker.engine.spec import ModelSpec


class MnistCNN(nn.Module):
    """Paper A.2: conv 16 and conv 32 (5x5, pad 2, ReLU, max-pool 2), then FC 256 -> 128 -> K."""

    def __init__(self, num_classes: int = 10, input_shape: tuple[int, int, int] = (1, 28, 28)) -> None:
        super().__init__()
        channels, height, width = input_shape
        self.features = nn.Sequential()
        self.features.add_module(
            "block1", nn.Sequential(nn.Conv2d(channels, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2))
        )
        self.features.add_module(
            "block2", nn.Sequential(nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2))
        )
        flat = 32 * (height // 4) * (width // 4)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, 256),
            nn.ReLU(),
            nn.Linear(256, 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18 (3x3 stem) with the paper's two-layer head 512 -> 256 -> K. ``layer3`` gives the
    256-channel map the MixBlock reads."""

    def __init__(self, num_classes: int = 10, input_shape: tuple[int, int, int] = (3, 32, 32)) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(input_shape[0], 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()
        )
        self.layer1 = self._stage(64, 64, 1)
        self.layer2 = self._stage(64, 128, 2)
        self.layer3 = self._stage(128, 256, 2)
        self.layer4 = self._stage(256, 512, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, num_classes))

    @staticmethod
    def _stage(in_planes: int, planes: int, stride: int) -> nn.Sequential:
        return nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.head(self.pool(x))


ModelFactory = Callable[[ModelSpec], nn.Module]

_ARCHITECTURES: dict[str, ModelFactory] = {
    "mnist_cnn": lambda spec: MnistCNN(spec.num_classes, spec.input_shape),
    "resnet18": lambda spec: ResNet18(spec.num_classes, spec.input_shape),
}


def register_architecture(name: str, factory: ModelFactory) -> None:
    """Plug in any ``nn.Module``: its spec names the feature layer the generator reads."""
    _ARCHITECTURES[name] = factory


def known_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


def build_model(spec: ModelSpec) -> nn.Module:
    factory = _ARCHITECTURES.get(spec.architecture)
    if factory is None:
        raise ValueError(
            f"unknown architecture {spec.architecture!r}; known: {', '.join(known_architectures())}"
        )
    model = factory(spec)
    feature_module(model, spec)  # fail early on a wrong feature_layer
    return model


def feature_module(model: nn.Module, spec: ModelSpec) -> nn.Module:
    try:
        return model.get_submodule(spec.feature_layer)
    except AttributeError as exc:
        raise ValueError(f"model has no layer {spec.feature_layer!r} (spec.feature_layer)") from exc


class FeatureTap:
    """Runs the model and returns (logits, feature map of ``spec.feature_layer``) via a forward hook."""

    def __init__(self, model: nn.Module, spec: ModelSpec) -> None:
        self.model = model
        self._captured: torch.Tensor | None = None
        self._handle = feature_module(model, spec).register_forward_hook(self._capture)

    def _capture(self, _module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        self._captured = output

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        features = self._captured
        if features is not None and features.dim() == 2:
            # A fully connected layer's (N, C) output is read as a C x 1 x 1 map: the MixBlock then learns
            # one mixing ratio per pair instead of a spatial mask.
            features = features[:, :, None, None]
        if features is None or features.dim() != 4:
            raise ValueError("the feature layer must output a map (N, C, H, W) or a vector (N, C)")
        self._captured = None
        return logits, features

    def close(self) -> None:
        self._handle.remove()
