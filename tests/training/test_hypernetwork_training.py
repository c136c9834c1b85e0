"""Hypernetwork training through the shared loop: it learns, its files are the webui's, it resumes exactly,
and the shared base model is left as it was."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from tests.training.conftest import stop_after
from training.base_model import BaseModel
from training.hypernetwork import Hypernetwork, load_hypernetwork_optim
from training.hypernetwork_attention import apply_hypernetwork
from training.hypernetwork_training import HypernetworkOptions, train_hypernetwork
from training.training_loop import LoopSettings


def run_settings(**overrides) -> LoopSettings:
    values = dict(name="myhyper", learning_rate="0.001", max_steps=6, save_every=3, template="hypernetwork",
                  latent_sampling_method="deterministic")  # fmt: skip
    return LoopSettings(**{**values, **overrides})


def unet_state(base: BaseModel) -> tuple[dict[str, torch.Tensor], list[type]]:
    tensors = {key: value.clone() for key, value in base.unet.state_dict().items()}
    return tensors, [type(processor) for processor in base.unet.attn_processors.values()]


def test_the_validation_loss_falls_and_the_base_model_is_untouched(
    tiny_base: BaseModel, subject_examples, tmp_path: Path
) -> None:
    before, processors = unet_state(tiny_base)
    examples = subject_examples[:4]
    settings = run_settings(max_steps=30, save_every=5, learning_rate="0.003")
    result = train_hypernetwork(tiny_base, examples, settings, HypernetworkOptions(), tmp_path / "run",
                                validation_examples=examples)  # fmt: skip
    first, last = result.validations[0].validation_loss, result.validations[-1].validation_loss
    assert last < first, (first, last)
    after, processors_after = unet_state(tiny_base)
    assert processors_after == processors
    assert all(torch.equal(before[key], after[key]) for key in before)
    assert all(not parameter.requires_grad for parameter in tiny_base.unet.parameters())


def test_the_files_are_the_webuis_and_change_the_unet(tiny_base: BaseModel, subject_examples, tmp_path: Path) -> None:
    options = HypernetworkOptions(layer_structure=(1.0, 2.0, 1.0), activation_func="relu", add_layer_norm=True)
    result = train_hypernetwork(tiny_base, subject_examples[:4], run_settings(), options, tmp_path)
    assert set(result.files) >= {"webui_pt", "webui_optim", "checkpoint_3_webui_pt", "loss_csv", "loss_png"}
    loaded = Hypernetwork.load(result.files["webui_pt"])
    assert (loaded.name, loaded.step, loaded.activation_func, loaded.add_layer_norm) == ("myhyper", 6, "relu", True)
    assert loaded.sd_checkpoint == tiny_base.short_hash and sorted(loaded.layers) == [32]
    assert Hypernetwork.load(result.files["checkpoint_3_webui_pt"]).step == 3
    name, state = load_hypernetwork_optim(result.files["webui_pt"])
    assert name == "AdamW" and state["state"]
    raw = torch.load(result.files["webui_pt"], weights_only=True)
    assert set(raw[32][0]) == set(loaded.layers[32][0].state_dict())  # (k, v) state dicts under the integer width

    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = tiny_base.unet(latents, 10, encoder_hidden_states=context).sample
        with apply_hypernetwork(tiny_base.unet, loaded.frozen()):
            hyper = tiny_base.unet(latents, 10, encoder_hidden_states=context).sample
    assert not torch.allclose(plain, hyper)


def test_the_same_seed_gives_the_same_hypernetwork_and_a_killed_run_resumes_exactly(
    tiny_base: BaseModel, subject_examples, tmp_path: Path
) -> None:
    examples, settings, options = subject_examples[:4], run_settings(save_every=2), HypernetworkOptions()
    whole = train_hypernetwork(tiny_base, examples, settings, options, tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        train_hypernetwork(tiny_base, examples, settings, options, tmp_path / "cut", progress=stop_after(5))
    resumed = train_hypernetwork(tiny_base, examples, settings, options, tmp_path / "cut")
    assert resumed.resumed_from == 4 and resumed.losses == whole.losses
    assert all(torch.equal(resumed.weights[key], whole.weights[key]) for key in whole.weights)
    other = train_hypernetwork(tiny_base, examples, dataclasses.replace(settings, seed=1), options, tmp_path / "other")
    assert any(not torch.equal(other.weights[key], whole.weights[key]) for key in whole.weights)


def test_a_diverging_run_fails_naming_the_method(tiny_base: BaseModel, subject_examples, tmp_path: Path) -> None:
    with pytest.raises(Exception, match=r"hypernetwork diverged at step \d+"):
        train_hypernetwork(tiny_base, subject_examples[:2], run_settings(learning_rate="1e30"), HypernetworkOptions(),
                           tmp_path)  # fmt: skip
    assert not (tmp_path / "myhyper.pt").exists()
