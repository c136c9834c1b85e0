"""LoRA on the tiny SD model: bit-exact removal, the kohya and diffusers files, and other loaders reading them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from training.base_model import BaseModel
from training.evaluation import build_pipeline, lora_applied, METHOD_APPLIERS
from training.lora import (
    ADAPTER,
    TEXT_ENCODER_TARGETS,
    UNET_TARGETS,
    LoraFileError,
    LoraShape,
    LoraWeights,
    collect_weights,
    lora_injected,
    lora_weights_applied,
    read_kohya,
    save_diffusers,
    save_kohya,
    tag_frequency,
)
from training.prompt_encoding import encode_input_ids
from training.xyz_grid import Checkpoint

PROMPT = "a photo of sks, red, round"


def _snapshot(base: BaseModel) -> dict[str, object]:
    """Everything removal must restore: the tensors' values, the module objects and the gradient flags."""
    return {
        "tensors": {f"{part}.{k}": v.clone() for part, model in (("unet", base.unet), ("te", base.text_encoder))
                    for k, v in model.state_dict().items()},
        "modules": {f"{part}.{n}": m for part, model in (("unet", base.unet), ("te", base.text_encoder))
                    for n, m in model.named_modules()},
        "grad": [p.requires_grad for model in (base.unet, base.text_encoder) for p in model.parameters()],
        "attributes": (set(base.unet.__dict__), set(base.text_encoder.__dict__)),
    }  # fmt: skip


def _assert_restored(base: BaseModel, snapshot: dict[str, object]) -> None:
    now = _snapshot(base)
    assert now["tensors"].keys() == snapshot["tensors"].keys()
    assert all(torch.equal(now["tensors"][k], v) for k, v in snapshot["tensors"].items())
    assert now["modules"].keys() == snapshot["modules"].keys()
    assert all(now["modules"][k] is m for k, m in snapshot["modules"].items())
    assert now["grad"] == snapshot["grad"]
    assert now["attributes"] == snapshot["attributes"]


def _noise(base: BaseModel, prompt: str = PROMPT) -> torch.Tensor:
    """The UNet's prediction for fixed latents, timestep and prompt (through the text encoder, so its LoRA counts)."""
    generator = torch.Generator().manual_seed(3)
    side = base.unet.config.sample_size
    latents = torch.randn(2, 4, side, side, generator=generator)
    ids = base.tokenizer([prompt] * 2, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        conditioning = encode_input_ids(base.text_encoder, ids.input_ids, 1)
        return base.unet(latents, torch.tensor([20, 700]), conditioning).sample


def _trained_like_weights(base: BaseModel, shape: LoraShape, text_encoder: bool = True) -> tuple[LoraWeights, torch.Tensor]:
    """Adapters with non-zero lora_up (as after training) and the UNet output with them in place."""
    generator = torch.Generator().manual_seed(0)
    with lora_injected(base.unet, UNET_TARGETS, shape, generator=generator) as unet_layers:
        te_layers = {}
        with lora_injected(base.text_encoder, TEXT_ENCODER_TARGETS, shape, generator=generator) as injected:
            if text_encoder:
                te_layers = injected
            for layer in list(unet_layers.values()) + list(te_layers.values()):
                torch.nn.init.normal_(layer.lora_B[ADAPTER].weight, std=0.3, generator=generator)
            noise = _noise(base)
            weights = collect_weights(unet_layers, te_layers)
    return weights, noise


def test_injection_trains_only_adapters_and_removal_restores_the_base_bit_for_bit(tiny_base: BaseModel):
    snapshot = _snapshot(tiny_base)
    before = _noise(tiny_base)
    shape = LoraShape(rank=2, alpha=1.0)
    n_attention = sum(name.endswith(("to_q", "to_k", "to_v", "to_out.0")) for name, _ in tiny_base.unet.named_modules())
    with pytest.raises(RuntimeError, match="boom"):
        with lora_injected(tiny_base.unet, UNET_TARGETS, shape, generator=torch.Generator().manual_seed(0)) as layers:
            assert len(layers) == n_attention and n_attention > 0
            trainable = [p for p in tiny_base.unet.parameters() if p.requires_grad]
            assert len(trainable) == 2 * len(layers)  # lora_A and lora_B of each, nothing of the base
            assert torch.equal(_noise(tiny_base), before)  # lora_up starts at zero
            optimizer = torch.optim.AdamW(trainable, lr=0.1)
            for _ in range(2):
                optimizer.zero_grad()
                _noise_with_grad(tiny_base).square().mean().backward()
                optimizer.step()
            assert not torch.allclose(_noise(tiny_base), before)
            raise RuntimeError("boom")
    _assert_restored(tiny_base, snapshot)
    assert torch.equal(_noise(tiny_base), before)


def _noise_with_grad(base: BaseModel) -> torch.Tensor:
    side = base.unet.config.sample_size
    latents = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(1))
    ids = base.tokenizer([PROMPT], padding="max_length", max_length=77, return_tensors="pt").input_ids
    return base.unet(latents, torch.tensor([300]), encode_input_ids(base.text_encoder, ids, 1)).sample


def test_kohya_file_names_and_metadata_follow_sd_scripts(tiny_base: BaseModel, tmp_path: Path):
    weights, _ = _trained_like_weights(tiny_base, LoraShape(rank=4, alpha=2.0))
    path = save_kohya(tmp_path / "sks.safetensors", weights, {"ss_network_module": "networks.lora", "ss_network_dim": "4"})
    with safe_open(path, framework="pt") as handle:
        keys = set(handle.keys())
        assert handle.metadata()["ss_network_module"] == "networks.lora"
        alpha = handle.get_tensor("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0.alpha")
    # kohya: LORA_PREFIX + "." + module path, dots replaced by underscores; te modules under text_model.
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert {f"{stem}.lora_down.weight", f"{stem}.lora_up.weight", f"{stem}.alpha"} <= keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_out_proj.alpha" in keys
    assert alpha.dtype == torch.float32 and alpha.item() == 2.0
    n_modules = len(weights.unet) + len(weights.text_encoder)
    assert len(keys) == 3 * n_modules


def test_kohya_round_trip_through_our_loader(tiny_base: BaseModel, tmp_path: Path):
    snapshot = _snapshot(tiny_base)
    before = _noise(tiny_base)
    weights, noise = _trained_like_weights(tiny_base, LoraShape(rank=4, alpha=2.0))
    path = save_kohya(tmp_path / "sks.safetensors", weights, {"ss_output_name": "sks"})
    loaded, metadata = read_kohya(path, tiny_base.unet, tiny_base.text_encoder)
    assert metadata == {"ss_output_name": "sks"}
    assert loaded.tensors().keys() == weights.tensors().keys()
    assert all(torch.equal(loaded.tensors()[k], v) for k, v in weights.tensors().items())
    with lora_weights_applied(tiny_base.unet, tiny_base.text_encoder, loaded):
        assert torch.allclose(_noise(tiny_base), noise, atol=1e-6)
    with lora_weights_applied(tiny_base.unet, tiny_base.text_encoder, loaded, strength=0.0):
        assert torch.allclose(_noise(tiny_base), before, atol=1e-6)
    _assert_restored(tiny_base, snapshot)


@pytest.mark.parametrize("kind", ["diffusers", "kohya"])
def test_diffusers_load_lora_weights_reads_our_files(tiny_base: BaseModel, tmp_path: Path, kind: str):
    snapshot = _snapshot(tiny_base)
    before = _noise(tiny_base)
    weights, ours = _trained_like_weights(tiny_base, LoraShape(rank=4, alpha=2.0))  # alpha != rank: scale must carry
    if kind == "kohya":
        path = save_kohya(tmp_path / "sks.safetensors", weights, {"ss_network_module": "networks.lora"})
    else:
        path = save_diffusers(tmp_path / "diffusers" / "pytorch_lora_weights.safetensors", weights)
        with safe_open(path, framework="pt") as handle:
            keys = list(handle.keys())
        assert any(k.startswith("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.") for k in keys)
        assert any(k.startswith("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.") for k in keys)
    pipeline = build_pipeline(tiny_base)
    pipeline.load_lora_weights(str(path), adapter_name="ours")
    try:
        loaded = _noise(tiny_base)
    finally:
        pipeline.unload_lora_weights()
    assert (loaded - before).abs().max() > 1e-2
    assert torch.allclose(loaded, ours, atol=1e-5)
    assert torch.equal(_noise(tiny_base), before)
    for model in (tiny_base.unet, tiny_base.text_encoder):  # what diffusers' unload leaves (our applier removes it)
        model.requires_grad_(False)
        model.__dict__.pop("_hf_peft_config_loaded", None)
    _assert_restored(tiny_base, snapshot)


def test_evaluation_applier_uses_strength_and_leaves_the_pipeline_bit_identical(tiny_base: BaseModel, tmp_path: Path):
    assert METHOD_APPLIERS["lora"] is lora_applied
    snapshot = _snapshot(tiny_base)
    before = _noise(tiny_base)
    weights, ours = _trained_like_weights(tiny_base, LoraShape(rank=4, alpha=4.0))
    path = save_kohya(tmp_path / "sks.safetensors", weights, {})
    pipeline = build_pipeline(tiny_base)
    checkpoint = Checkpoint(method="lora", step=10, path=path, name="sks")
    results = {}
    for strength in (0.0, 0.5, 1.0):
        with lora_applied(pipeline, checkpoint, strength, clip_skip=1) as encode:
            results[strength] = _noise(tiny_base)
            assert encode(PROMPT).shape == (1, 77, tiny_base.text_encoder.config.hidden_size)
        _assert_restored(tiny_base, snapshot)
    assert torch.allclose(results[0.0], before, atol=1e-6)
    assert torch.allclose(results[1.0], ours, atol=1e-5)
    assert 0 < (results[0.5] - before).abs().max() < (results[1.0] - before).abs().max()


def test_bad_kohya_files_fail_naming_the_file(tiny_base: BaseModel, tmp_path: Path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(LoraFileError, match="garbage.safetensors"):
        read_kohya(garbage, tiny_base.unet, tiny_base.text_encoder)
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    half = tmp_path / "half.safetensors"
    save_file({f"{stem}.lora_down.weight": torch.zeros(4, 32)}, half)
    with pytest.raises(LoraFileError, match="half.safetensors.*has no .*lora_up"):
        read_kohya(half, tiny_base.unet, tiny_base.text_encoder)
    alien = tmp_path / "alien.safetensors"
    save_file({"lora_unet_no_such_block.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_no_such_block.lora_up.weight": torch.zeros(32, 4)}, alien)  # fmt: skip
    with pytest.raises(LoraFileError, match="alien.safetensors: lora_unet_no_such_block names no module"):
        read_kohya(alien, tiny_base.unet, tiny_base.text_encoder)
    wrong = tmp_path / "wrong.safetensors"
    save_file({f"{stem}.lora_down.weight": torch.zeros(4, 7), f"{stem}.lora_up.weight": torch.zeros(32, 4)}, wrong)
    loaded, _ = read_kohya(wrong, tiny_base.unet, tiny_base.text_encoder)
    snapshot = _snapshot(tiny_base)
    with pytest.raises(LoraFileError, match="shape"):
        with lora_weights_applied(tiny_base.unet, tiny_base.text_encoder, loaded):
            pass
    _assert_restored(tiny_base, snapshot)


def test_shape_validation_and_tag_frequency():
    with pytest.raises(ValueError, match="rank"):
        LoraShape(rank=0)
    with pytest.raises(ValueError, match="dropout"):
        LoraShape(dropout=1.0)
    assert LoraShape(rank=8, alpha=4).scale == 0.5
    assert tag_frequency(["red, round", "red, red, square"], "10_sks") == {"10_sks": {"red": 2, "round": 1, "square": 1}}
