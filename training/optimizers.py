"""The optimizers a training run can use: torch's AdamW, or bitsandbytes' 8-bit AdamW.

Why a probe step for 8-bit AdamW: bitsandbytes often imports fine and fails only at the first update
(no CUDA, a CPU-only build, a mismatched CUDA runtime). Failing before training starts, with the
reason, beats failing after the VAE has encoded every image.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import torch

OPTIMIZERS = ("adamw", "adamw8bit")
# What the webui writes as optimizer_name in `.pt.optim` files.
WEBUI_OPTIMIZER_NAMES = {"adamw": "AdamW", "adamw8bit": "AdamW8bit"}


class OptimizerUnavailableError(RuntimeError):
    """The requested optimizer cannot run here; the message says why and what to use instead."""


def _bitsandbytes_adamw8bit() -> type[torch.optim.Optimizer]:
    try:
        module = importlib.import_module("bitsandbytes")
        return module.optim.AdamW8bit
    except Exception as error:  # ImportError, or a broken install raising anything at import time
        raise OptimizerUnavailableError(
            f"optimizer adamw8bit needs the bitsandbytes package, which cannot be imported here ({error}); "
            "install bitsandbytes for your CUDA version, or set optimizer: adamw"
        ) from error


def _probe(optimizer_class: type[torch.optim.Optimizer], device: torch.device) -> None:
    probe = torch.nn.Parameter(torch.zeros(8, device=device))
    probe.grad = torch.ones_like(probe)
    try:
        optimizer_class([probe], lr=1e-3).step()
    except Exception as error:
        raise OptimizerUnavailableError(
            f"optimizer adamw8bit: bitsandbytes is installed but its AdamW8bit cannot update a tensor on "
            f"{device} ({type(error).__name__}: {error}); set optimizer: adamw"
        ) from error


def _first_device(parameters: Sequence[torch.nn.Parameter] | Sequence[dict[str, Any]]) -> torch.device:
    first = parameters[0]
    return (first["params"][0] if isinstance(first, dict) else first).device


def make_optimizer(
    name: str, parameters: Sequence[torch.nn.Parameter] | Sequence[dict[str, Any]], lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    """AdamW over exactly `parameters` (what the method trains, as tensors or torch parameter groups), so
    weight decay cannot touch anything else."""
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    if name == "adamw8bit":
        optimizer_class = _bitsandbytes_adamw8bit()
        _probe(optimizer_class, _first_device(parameters))
        return optimizer_class(parameters, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
