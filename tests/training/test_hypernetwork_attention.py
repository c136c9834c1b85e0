"""Applying a hypernetwork to the tiny SD UNet: the webui's k/v maths, width matching, strength, exact restore, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from training.base_model import BaseModel
from training.hypernetwork import Hypernetwork, cross_attention_widths
from training.hypernetwork_attention import HypernetworkAttnProcessor, apply_hypernetwork


def _inputs(base: BaseModel, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    side = base.unet.config.sample_size
    latents = torch.randn(2, 4, side, side, generator=generator)
    context = torch.randn(2, 9, base.unet.config.cross_attention_dim, generator=generator)
    return latents, torch.tensor([10, 500]), context


def _noise(base: BaseModel, seed: int = 0) -> torch.Tensor:
    with torch.no_grad():
        return base.unet(*_inputs(base, seed)).sample


def _hypernetwork(sizes: tuple[int, ...], seed: int = 0) -> Hypernetwork:
    torch.manual_seed(seed)
    return Hypernetwork("test", sizes, (1, 2, 1), "relu", "XavierNormal", add_layer_norm=True)


def _attention_layers(base: BaseModel) -> dict[str, Attention]:
    return {name: module for name, module in base.unet.named_modules() if isinstance(module, Attention)}


def test_strength_zero_is_the_identity_and_strength_one_changes_the_noise(tiny_base: BaseModel):
    hypernetwork = _hypernetwork(cross_attention_widths(tiny_base.unet.config))
    assert list(hypernetwork.layers) == [tiny_base.unet.config.cross_attention_dim]
    before = _noise(tiny_base)
    with apply_hypernetwork(tiny_base.unet, hypernetwork, strength=0.0):
        assert torch.equal(_noise(tiny_base), before)
    with apply_hypernetwork(tiny_base.unet, hypernetwork, strength=1.0):
        full = _noise(tiny_base)
    with apply_hypernetwork(tiny_base.unet, hypernetwork, strength=0.5):
        half = _noise(tiny_base)
    assert (full - before).abs().max() > 1e-3
    assert 0 < (half - before).abs().max() < (full - before).abs().max()


def test_leaving_restores_the_same_processors_and_a_bit_identical_unet(tiny_base: BaseModel):
    processors = tiny_base.unet.attn_processors
    hypernetwork = _hypernetwork((32, 64)).set_multiplier(0.7)
    before = _noise(tiny_base, seed=1)
    with apply_hypernetwork(tiny_base.unet, hypernetwork, strength=1.0):
        wrapped = tiny_base.unet.attn_processors
        assert any(isinstance(processor, HypernetworkAttnProcessor) for processor in wrapped.values())
        assert all(module.multiplier == 1.0 for module in hypernetwork.modules())
    assert all(tiny_base.unet.attn_processors[name] is processor for name, processor in processors.items())
    assert all(module.multiplier == 0.7 for module in hypernetwork.modules())
    assert torch.equal(_noise(tiny_base, seed=1), before)

    with pytest.raises(RuntimeError, match="boom"):
        with apply_hypernetwork(tiny_base.unet, hypernetwork):
            raise RuntimeError("boom")
    assert all(tiny_base.unet.attn_processors[name] is processor for name, processor in processors.items())


def test_modules_apply_where_the_kv_input_width_matches_as_in_the_webui(tiny_base: BaseModel):
    layers = _attention_layers(tiny_base)
    cross = {name for name, attn in layers.items() if attn.is_cross_attention}
    assert cross and all(layers[name].to_k.in_features == 32 for name in cross)
    with apply_hypernetwork(tiny_base.unet, _hypernetwork((64,))) as changed:
        # Only the self-attention layers of the 64-channel blocks: their context is the image tokens.
        assert changed and set(changed) == {name for name, attn in layers.items() if attn.to_k.in_features == 64}
        assert not set(changed) & cross
    with apply_hypernetwork(tiny_base.unet, _hypernetwork((32,))) as changed:
        assert cross <= set(changed)
    with apply_hypernetwork(tiny_base.unet, _hypernetwork((768,))) as changed:
        assert changed == []


def test_one_layer_computes_k_and_v_from_the_hypernetwork_context_with_sdpa(tiny_base: BaseModel, monkeypatch):
    name, attn = next((name, attn) for name, attn in _attention_layers(tiny_base).items() if attn.is_cross_attention)
    assert isinstance(attn.processor, AttnProcessor2_0)
    hypernetwork = _hypernetwork((32,))
    hyper_k, hyper_v = hypernetwork.layers[32]
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 16, attn.to_q.in_features, generator=generator)
    context = torch.randn(2, 9, 32, generator=generator)
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    with torch.no_grad(), apply_hypernetwork(tiny_base.unet, hypernetwork, strength=0.8) as changed:
        assert name in changed and attn.processor.original.__class__ is AttnProcessor2_0
        out = attn(hidden, encoder_hidden_states=context)
        heads = attn.heads
        q = attn.to_q(hidden)
        k = attn.to_k(context + 0.8 * hyper_k.linear(context))
        v = attn.to_v(context + 0.8 * hyper_v.linear(context))
        split = lambda t: t.view(2, -1, heads, t.shape[-1] // heads).transpose(1, 2)  # noqa: E731
        expected = sdpa(split(q), split(k), split(v)).transpose(1, 2).reshape(2, -1, q.shape[-1])
        expected = attn.to_out[0](expected)
    assert calls == [1]  # the wrapped processor still runs torch's fused attention
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_wraps_whatever_processor_is_installed(tiny_base: BaseModel):
    processors = tiny_base.unet.attn_processors
    hypernetwork = _hypernetwork((32,))
    try:
        with apply_hypernetwork(tiny_base.unet, hypernetwork):
            sdpa = _noise(tiny_base)
        tiny_base.unet.set_attn_processor(AttnProcessor())
        with apply_hypernetwork(tiny_base.unet, hypernetwork):
            classic = _noise(tiny_base)
            assert {type(p.original) for p in tiny_base.unet.attn_processors.values()
                    if isinstance(p, HypernetworkAttnProcessor)} == {AttnProcessor}
    finally:
        tiny_base.unet.set_attn_processor(processors)
    torch.testing.assert_close(classic, sdpa, rtol=1e-4, atol=1e-5)


def test_gradients_reach_only_the_hypernetwork(tiny_base: BaseModel):
    assert not any(parameter.requires_grad for parameter in tiny_base.unet.parameters())
    hypernetwork = _hypernetwork((32,)).train()
    try:
        with apply_hypernetwork(tiny_base.unet, hypernetwork):
            loss = tiny_base.unet(*_inputs(tiny_base)).sample.pow(2).mean()
        loss.backward()
        gradients = [parameter.grad for parameter in hypernetwork.parameters()]
        assert all(gradient is not None and torch.isfinite(gradient).all() for gradient in gradients)
        assert all(gradient.abs().sum() > 0 for gradient in gradients)
        assert all(parameter.grad is None for parameter in tiny_base.unet.parameters())
    finally:
        hypernetwork.frozen()


def test_a_hypernetwork_on_another_device_is_refused_before_anything_changes(tiny_base: BaseModel):
    hypernetwork = _hypernetwork((32,)).to("meta")
    processors = tiny_base.unet.attn_processors
    with pytest.raises(ValueError, match="hypernetwork 'test' is on \\['meta'\\].*hypernetwork.to\\(device\\)"):
        with apply_hypernetwork(tiny_base.unet, hypernetwork):
            pass
    assert all(tiny_base.unet.attn_processors[name] is processor for name, processor in processors.items())


def test_nested_hypernetworks_chain_in_the_webui_order(tiny_base: BaseModel):
    """The webui applies several hypernetworks one after the other: k = to_k(second_k(first_k(context)))."""
    attn = next(attn for attn in _attention_layers(tiny_base).values() if attn.is_cross_attention)
    first, second = _hypernetwork((32,), seed=1), _hypernetwork((32,), seed=2)
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(1, 16, attn.to_q.in_features, generator=generator)
    context = torch.randn(1, 9, 32, generator=generator)
    with torch.no_grad():
        with apply_hypernetwork(tiny_base.unet, first), apply_hypernetwork(tiny_base.unet, second):
            nested = attn(hidden, encoder_hidden_states=context)
        k = attn.to_k(second.layers[32][0](first.layers[32][0](context)))
        v = attn.to_v(second.layers[32][1](first.layers[32][1](context)))
        heads, q = attn.heads, attn.to_q(hidden)
        split = lambda t: t.view(1, -1, heads, t.shape[-1] // heads).transpose(1, 2)  # noqa: E731
        attended = F.scaled_dot_product_attention(split(q), split(k), split(v))
        expected = attn.to_out[0](attended.transpose(1, 2).reshape(1, -1, q.shape[-1]))
    torch.testing.assert_close(nested, expected, rtol=1e-5, atol=1e-6)
