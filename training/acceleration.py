"""Speed and memory options for the frozen UNet during training: attention kernel, gradient checkpointing,
torch.compile and mixed precision.

Why a context manager: the loaded base model is shared with evaluation and later runs, so every switch a
run turns on is turned back off when it ends (even on error), and a run never inherits another's options.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

ATTENTION_KINDS = ("sdpa", "classic")
MIXED_PRECISION_MODES = ("no", "fp16", "bf16")
_AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@contextlib.contextmanager
def accelerated_unet(
    unet: UNet2DConditionModel, *, attention: str, gradient_checkpointing: bool, compile_unet: bool
) -> Iterator[torch.nn.Module]:
    """The UNet to call during training, with the run's options; the shared module is restored afterwards.

    "sdpa" is torch's fused scaled-dot-product attention (flash/memory-efficient kernels on CUDA),
    "classic" the explicit softmax(QK^T)V the webui used before it. Gradient checkpointing recomputes
    the UNet's activations in the backward pass instead of keeping them: less memory, about 30% slower.
    """
    if attention not in ATTENTION_KINDS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_KINDS)}, got {attention!r}")
    processors = unet.attn_processors
    was_checkpointing = unet.is_gradient_checkpointing
    unet.set_attn_processor(AttnProcessor2_0() if attention == "sdpa" else AttnProcessor())
    if gradient_checkpointing and not was_checkpointing:
        unet.enable_gradient_checkpointing()
    try:
        yield torch.compile(unet) if compile_unet else unet
    finally:
        unet.set_attn_processor(processors)
        if gradient_checkpointing and not was_checkpointing:
            unet.disable_gradient_checkpointing()


def autocast_dtype(mode: str, device: torch.device, weights_dtype: torch.dtype) -> torch.dtype | None:
    """The dtype the forward pass computes in under autocast; None for plain full precision.

    fp16 needs loss scaling, which only CUDA's gradient scaler provides, so it is refused elsewhere;
    bf16 has float32's range and also runs on CPU. With "no", half weights on CUDA still autocast in
    their own dtype, as the webui trains half-precision models.
    """
    if mode not in MIXED_PRECISION_MODES:
        raise ValueError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION_MODES)}, got {mode!r}")
    if mode == "fp16" and device.type != "cuda":
        raise ValueError(f"mixed_precision fp16 needs a CUDA device for its loss scaling; on {device.type} use bf16 or no")
    if mode != "no":
        return _AUTOCAST_DTYPES[mode]
    if device.type == "cuda" and weights_dtype in (torch.float16, torch.bfloat16):
        return weights_dtype
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def needs_loss_scaling(device: torch.device, dtype: torch.dtype | None) -> bool:
    """fp16 gradients underflow without it; bf16 and float32 do not need it."""
    return device.type == "cuda" and dtype == torch.float16
