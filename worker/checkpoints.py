"""The torch side of checkpoints: a model's state dict to and from safetensors bytes.

Never ``torch.load``: unpickling an uploaded file runs arbitrary code. safetensors holds tensors only, and
every load is checked key by key and shape by shape against the architecture the spec names, so a checkpoint
for another model fails here with a clear error instead of deep inside the engine.
"""

from __future__ import annotations

from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn

from worker.engine.models import build_model
from worker.engine.spec import ModelSpec


class CheckpointMismatch(ValueError):
    """The bytes are not a safetensors file, or their tensors do not fit the spec's architecture."""


def state_dict_to_bytes(model: nn.Module, metadata: dict[str, str] | None = None) -> bytes:
    """Serialise ``model``'s parameters and buffers (moved to CPU, contiguous) as safetensors bytes."""
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    return safetensors_save(tensors, metadata=metadata)


def load_state_dict(data: bytes, spec: ModelSpec) -> nn.Module:
    """Build ``spec``'s model and load ``data`` into it, refusing missing, extra or reshaped tensors."""
    try:
        tensors: dict[str, Any] = safetensors_load(data)
    except (SafetensorError, ValueError) as exc:
        raise CheckpointMismatch(f"not a safetensors checkpoint: {exc}") from exc
    model = build_model(spec)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    reshaped = sorted(
        f"{name}: {tuple(tensors[name].shape)} != {tuple(ref.shape)}"
        for name, ref in expected.items()
        if name in tensors and tensors[name].shape != ref.shape
    )
    if missing or unexpected or reshaped:
        raise CheckpointMismatch(
            f"checkpoint does not fit {spec.architecture}: missing={missing[:5]} unexpected={unexpected[:5]} "
            f"reshaped={reshaped[:5]}"
        )
    model.load_state_dict({name: t.to(expected[name].dtype) for name, t in tensors.items()}, strict=True)
    return model.eval()
