"""Where the engine runs: device, mixed precision and thread count, decided once per job."""

from __future__ import annotations

import contextlib
import platform
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    mixed_precision: bool  # autocast on CUDA (bf16 where supported, else fp16 with a grad scaler)

    @classmethod
    def detect(cls, prefer_cuda: bool = True) -> Runtime:
        if prefer_cuda and torch.cuda.is_available():
            # Float32 outside autocast means float32: no TF32 convolutions or matrix products. Training runs
            # under autocast (bf16) and is unaffected; what is left in float32 is the evidence
            # (``predict_logits``), whose scores must match the CPU's.
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
            return cls(torch.device("cuda"), mixed_precision=True)
        return cls(torch.device("cpu"), mixed_precision=False)

    def describe(self) -> dict[str, object]:
        """Where a job ran, for its provenance."""
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else platform.processor()
        return {
            "device": str(self.device),
            "device_name": name or platform.machine(),
            "mixed_precision": self.mixed_precision,
            "torch": torch.__version__,
            "cpu_threads": torch.get_num_threads(),
        }

    @property
    def amp_dtype(self) -> torch.dtype:
        if self.device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        if not self.mixed_precision:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        # Only fp16 needs loss scaling; bf16 has fp32's range.
        enabled = self.mixed_precision and self.amp_dtype == torch.float16
        return torch.amp.GradScaler(self.device.type, enabled=enabled)


CPU = Runtime(torch.device("cpu"), mixed_precision=False)
