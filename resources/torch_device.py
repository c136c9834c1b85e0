"""Which torch device and precision the model stages use."""

from __future__ import annotations

import torch
from dagster import ConfigurableResource
from pydantic import Field

_PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TorchDevice(ConfigurableResource):
    """`auto` picks CUDA when present; half precision is only used on CUDA, where it pays off and is safe."""

    device: str = Field(default="auto", description="auto, cpu, cuda, cuda:N or mps")
    precision: str = Field(default="auto", description="auto (fp16 on CUDA, fp32 elsewhere), fp32, fp16 or bf16")

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {self.device!r} was asked for but torch sees no CUDA device")
        return device

    def dtype(self) -> torch.dtype:
        device = self.torch_device()
        if self.precision == "auto":
            return torch.float16 if device.type == "cuda" else torch.float32
        if self.precision not in _PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of auto, {', '.join(_PRECISIONS)}")
        dtype = _PRECISIONS[self.precision]
        if dtype == torch.float16 and device.type == "cpu":
            raise ValueError("fp16 on the CPU is not supported by most kernels; use fp32 or bf16")
        return dtype
