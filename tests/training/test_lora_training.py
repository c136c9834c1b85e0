"""LoRA through the shared training loop on the tiny model: the loss falls, files load, a stopped run resumes exactly."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from tests.training.conftest import stop_after
from tests.training.test_lora import _assert_restored, _snapshot
from training.base_model import BaseModel
from training.lora import LoraMethod, LoraShape, LoraTraining, lora_weights_applied, read_kohya, train_lora
from training.training_loop import LoopSettings


def loop_settings(**overrides) -> LoopSettings:
    values = dict(name="sks", learning_rate="1e-3", max_steps=6, batch_size=2, seed=0)
    return LoopSettings(**{**values, **overrides})


def test_the_loss_falls_against_an_untrained_control(tiny_base: BaseModel, subject_examples, tmp_path: Path) -> None:
    """As for textual inversion: the same seed with a negligible rate draws the same timesteps, noise and
    prompts, so the step-by-step difference is what training the adapters did (single-step losses are
    dominated by their random timestep)."""
    snapshot = _snapshot(tiny_base)
    run = loop_settings(learning_rate="2e-2", max_steps=30, batch_size=2)
    lora = LoraTraining(LoraShape(rank=4, alpha=4.0))
    examples = subject_examples[:8]
    trained = train_lora(tiny_base, examples, run, lora, tmp_path / "trained")
    control = train_lora(tiny_base, examples, dataclasses.replace(run, learning_rate="1e-12"), lora,
                         tmp_path / "control")  # fmt: skip
    _assert_restored(tiny_base, snapshot)
    trained_losses, control_losses = np.array(trained.losses), np.array(control.losses)
    assert trained_losses[0] == control_losses[0]  # lora_up starts at zero: the first step is the base model's
    improvement = control_losses[-10:] - trained_losses[-10:]  # measured: 0.23 on average, every step better
    assert improvement.mean() > 0.05
    assert (improvement > 0).mean() >= 0.8
    files = trained.files
    for key in ("kohya", "diffusers", "loss_csv", "loss_png"):
        assert files[key].is_file(), key
    assert files["kohya"] == tmp_path / "trained" / "sks.safetensors"
    assert files["diffusers"] == tmp_path / "trained" / "diffusers" / "pytorch_lora_weights.safetensors"
    with safe_open(files["kohya"], framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_network_dim"] == "4"
    assert metadata["ss_steps"] == "30" and metadata["ss_num_train_images"] == "8"
    assert metadata["ss_output_name"] == "sks" and metadata["ss_text_encoder_lr"] == "0"
    loaded, _ = read_kohya(files["kohya"], tiny_base.unet, tiny_base.text_encoder)
    assert all(torch.equal(loaded.tensors()[k], v) for k, v in trained.weights.tensors().items())


def test_text_encoder_rates_and_cached_prompts(tiny_base: BaseModel, subject_examples, tmp_path: Path) -> None:
    """Frozen text encoder: no te adapters and conditioning from the cache; trained: lora_te_ modules at their rate."""
    run = loop_settings(learning_rate="1e-3:2, 5e-4", max_steps=4)
    frozen = train_lora(tiny_base, subject_examples[:4], run, LoraTraining(), tmp_path / "frozen")
    assert not frozen.weights.text_encoder
    rates = train_lora(tiny_base, subject_examples[:4], run, LoraTraining(unet_lr=2e-3, text_encoder_lr=1e-4),
                       tmp_path / "te")  # fmt: skip
    assert rates.weights.text_encoder and rates.weights.unet
    assert any(not torch.equal(pair.up, torch.zeros_like(pair.up)) for pair in rates.weights.text_encoder.values())
    with safe_open(rates.files["kohya"], framework="pt") as handle:
        assert any(key.startswith("lora_te_text_model_encoder_layers_") for key in handle.keys())
        assert handle.metadata()["ss_unet_lr"] == "0.002" and handle.metadata()["ss_text_encoder_lr"] == "0.0001"
    groups = rates.optimizer.param_groups
    assert [group["lr"] for group in groups] == pytest.approx([1e-3, 5e-5])  # the last step's rate, scaled per group


def test_frozen_text_encoder_prompts_come_from_the_cache(tiny_base: BaseModel) -> None:
    prompts = ["a photo of sks", "sks, red", "a photo of sks"]
    frozen = LoraMethod(tiny_base, loop_settings(), LoraTraining())
    with frozen.trained_unet(tiny_base.unet):
        first = frozen.encode(prompts)
        assert torch.equal(frozen.encode(prompts[::-1]), first.flip(0))
    assert frozen.cached.encoded == 2 and not first.requires_grad  # each distinct prompt encoded once
    trained = LoraMethod(tiny_base, loop_settings(), LoraTraining(text_encoder_lr=1e-4))
    with trained.trained_unet(tiny_base.unet):
        assert trained.cached is None and trained.encode(prompts).requires_grad  # through the te adapters


def test_a_stopped_run_resumes_to_the_same_adapters(tiny_base: BaseModel, subject_examples, tmp_path: Path) -> None:
    """Dropout and a trained text encoder on: dropout's random stream is part of the saved state too."""
    snapshot = _snapshot(tiny_base)
    run = loop_settings(max_steps=6, save_every=2, shuffle_tags=True, tag_dropout=0.2, latent_sampling_method="random")
    lora = LoraTraining(LoraShape(rank=2, alpha=1.0, dropout=0.3), text_encoder_lr=5e-4)
    examples = subject_examples[:5]
    whole = train_lora(tiny_base, examples, run, lora, tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        train_lora(tiny_base, examples, run, lora, tmp_path / "stopped", progress=stop_after(5))
    _assert_restored(tiny_base, snapshot)  # interrupted: the shared model is still handed back untouched
    assert (tmp_path / "stopped" / "checkpoints" / "sks-4.safetensors").is_file()
    resumed = train_lora(tiny_base, examples, run, lora, tmp_path / "stopped")
    assert resumed.resumed_from == 4
    assert resumed.losses == whole.losses
    assert all(torch.equal(resumed.weights.tensors()[k], v) for k, v in whole.weights.tensors().items())
    assert sorted(resumed.files) == sorted(whole.files)
    assert {"checkpoint_2_kohya", "checkpoint_4_kohya", "checkpoint_6_kohya"} <= set(whole.files)
    with lora_weights_applied(tiny_base.unet, tiny_base.text_encoder, whole.weights):
        pass
    _assert_restored(tiny_base, snapshot)
