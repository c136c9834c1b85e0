"""Applying a hypernetwork to a diffusers UNet: the webui's `apply_hypernetworks`, as an attention-processor wrapper.

Why a wrapper around the installed processor instead of a processor of our own: the attention maths
(SDPA, the classic softmax path, xformers) stays exactly the one the UNet already uses; the wrapper only
hands it a view of the attention layer whose `to_k`/`to_v` first pass their input through the
hypernetwork's k/v module. Which layers: every attention layer whose k/v input width has a module, as in
the webui, where self-attention's context is the image tokens themselves.

Order matters with other processor switches: enter `apply_hypernetwork` inside `accelerated_unet` (which
installs fresh processors on entry), not around it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention

from training.hypernetwork import Hypernetwork, HypernetworkModule


def _through(module: HypernetworkModule, context: torch.Tensor) -> torch.Tensor:
    """The module in its own dtype (float32), the result back in the UNet's (the webui's cond_cast_float)."""
    dtype = next(module.parameters()).dtype
    return module(context.to(dtype)).to(context.dtype)


class _HyperAttentionView:
    """The attention layer as the wrapped processor sees it: everything delegated, but k/v see hyper(context)."""

    def __init__(self, attn: Attention, hyper_k: HypernetworkModule, hyper_v: HypernetworkModule) -> None:
        self._attn = attn
        self._hyper_k = hyper_k
        self._hyper_v = hyper_v

    def to_k(self, context: torch.Tensor) -> torch.Tensor:
        return self._attn.to_k(_through(self._hyper_k, context))

    def to_v(self, context: torch.Tensor) -> torch.Tensor:
        return self._attn.to_v(_through(self._hyper_v, context))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._attn, name)


class HypernetworkAttnProcessor:
    """Runs `original` with k = to_k(hyper_k(context)) and v = to_v(hyper_v(context))."""

    def __init__(self, original: Any, hyper_k: HypernetworkModule, hyper_v: HypernetworkModule) -> None:
        self.original = original
        self.hyper_k = hyper_k
        self.hyper_v = hyper_v

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """The parameters of diffusers' own processors, so `Attention.forward` passes the same keywords on."""
        view = _HyperAttentionView(attn, self.hyper_k, self.hyper_v)
        if temb is not None:
            kwargs["temb"] = temb
        return self.original(
            view, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask, **kwargs
        )


def _attention_layers(unet: torch.nn.Module) -> list[tuple[str, Attention]]:
    return [(name, module) for name, module in unet.named_modules() if isinstance(module, Attention)]


@contextlib.contextmanager
def apply_hypernetwork(
    unet: UNet2DConditionModel, hypernetwork: Hypernetwork, strength: float = 1.0
) -> Iterator[list[str]]:
    """The UNet with `hypernetwork` at `strength` inside the block; its processors (and the modules'
    multipliers) exactly as they were afterwards, even on error. Yields the names of the layers it changed.

    The hypernetwork must already be on the UNet's device (`hypernetwork.to(device)`). Strength applies in eval mode; in
    training mode the webui (and we) always use 1.
    """
    layers = _attention_layers(unet)
    devices = {parameter.device for parameter in hypernetwork.parameters()}
    if devices - {unet.device}:
        raise ValueError(
            f"apply_hypernetwork: hypernetwork {hypernetwork.name!r} is on {sorted(map(str, devices))}, the UNet on "
            f"{unet.device}; move it with hypernetwork.to(device) first"
        )
    if any(getattr(attn, "fused_projections", False) for _, attn in layers):
        raise ValueError("apply_hypernetwork: the UNet's k/v projections are fused; unfuse them first")
    originals = {name: attn.processor for name, attn in layers}
    multipliers = [module.multiplier for module in hypernetwork.modules()]
    changed = []
    try:
        hypernetwork.set_multiplier(strength)
        for name, attn in layers:
            pair = hypernetwork.layers.get(attn.to_k.in_features)
            if pair is not None:
                attn.set_processor(HypernetworkAttnProcessor(attn.processor, *pair))
                changed.append(name)
        yield changed
    finally:
        for name, attn in layers:
            if attn.processor is not originals[name]:
                attn.set_processor(originals[name])
        for module, multiplier in zip(hypernetwork.modules(), multipliers):
            module.multiplier = multiplier
