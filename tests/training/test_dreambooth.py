"""DreamBooth on the tiny model: the outputs load in diffusers and in our own single-file loader, the
evaluation swaps the fine-tuned weights in and back out, and the shared base model never changes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from training.base_model import BaseModel
from training.class_images import ClassImageSpec, generate_class_images
from training.dreambooth import DreamBoothOptions, save_diffusers_folder, train_dreambooth, trainable_copy
from training.evaluation import (
    RenderSettings,
    build_pipeline,
    dreambooth_applied,
    prompt_embeddings,
    render_cells,
    render_conditioned,
)
from training.single_file import load_single_file_pipeline, save_single_file
from training.training_loop import LoopSettings
from training.weight_swap import swapped_weights
from training.xyz_grid import CellSpec, Checkpoint


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


@pytest.fixture(scope="module")
def perturbed(tiny_base: BaseModel, tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path, Path]:
    """A stand-in for a fine-tuned UNet (the base one plus noise), written as our two DreamBooth outputs."""
    unet = trainable_copy(tiny_base.unet)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    out = tmp_path_factory.mktemp("dreambooth")
    folder = save_diffusers_folder(tiny_base, unet, tiny_base.text_encoder, out / "subject")
    single = save_single_file(unet, tiny_base.vae, tiny_base.text_encoder, out / "subject.safetensors")
    return unet, folder, single


def test_the_outputs_load_in_diffusers_and_our_loader(tiny_base: BaseModel, perturbed) -> None:
    unet, folder, single = perturbed
    from_folder = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    assert _same(_weights(from_folder.unet), _weights(unet))
    assert not _same(_weights(from_folder.unet), _weights(tiny_base.unet))
    # The diffusers folder beside the file (same stem) is the single file's config sidecar.
    from_file = load_single_file_pipeline(single, dtype=torch.float32)
    loaded, trained = _weights(from_file.unet), _weights(unet)
    assert loaded.keys() == trained.keys()
    assert all(torch.allclose(loaded[key], trained[key]) for key in loaded)


def test_the_evaluation_swaps_the_weights_in_and_back(tiny_base: BaseModel, perturbed) -> None:
    unet, _, single = perturbed
    before = _weights(tiny_base.unet), _weights(tiny_base.text_encoder)
    pipeline = build_pipeline(tiny_base)
    checkpoint = Checkpoint("dreambooth", 10, single, "subject")
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    conditioning = prompt_embeddings(pipeline, "a photo of subject", 1)
    with torch.no_grad():
        base_out = tiny_base.unet(latents, 10, encoder_hidden_states=conditioning).sample
        trained_out = unet(latents, 10, encoder_hidden_states=conditioning).sample
        with dreambooth_applied(pipeline, checkpoint, 1.0, 1) as encode:
            swapped_out = pipeline.unet(latents, 10, encoder_hidden_states=encode("a photo of subject")).sample
        with swapped_weights(pipeline.unet, pipeline.text_encoder, single, 0.5):
            half = _weights(pipeline.unet)
    assert torch.allclose(swapped_out, trained_out, atol=1e-5)
    assert not torch.allclose(swapped_out, base_out)
    key = "conv_in.weight"
    expected_half = (before[0][key] + unet.state_dict()[key]) / 2
    assert torch.allclose(half[key], expected_half, atol=1e-6)  # strength: a linear blend of the weights
    assert _same(_weights(tiny_base.unet), before[0]) and _same(_weights(tiny_base.text_encoder), before[1])


def test_a_file_that_is_not_a_checkpoint_is_refused_and_nothing_changes(tiny_base: BaseModel, tmp_path: Path) -> None:
    before = _weights(tiny_base.unet)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="bad.safetensors"):
        with swapped_weights(tiny_base.unet, tiny_base.text_encoder, bad):
            pass
    assert _same(_weights(tiny_base.unet), before)


CLASS_PROMPT = "a photo of a round thing"


def loop_settings(**overrides) -> LoopSettings:
    values = dict(name="sks", learning_rate="0.001", batch_size=2, max_steps=8, template="subject",
                  latent_sampling_method="deterministic")  # fmt: skip
    return LoopSettings(**{**values, **overrides})


@pytest.fixture(scope="module")
def class_image_paths(tiny_base: BaseModel, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    spec = ClassImageSpec(prompt=CLASS_PROMPT, size=64, count=4, steps=2, sampler="ddim")
    return generate_class_images(tiny_base, spec, tmp_path_factory.mktemp("class")).paths


@pytest.fixture
def examples(subject_examples) -> list:
    return subject_examples[:8]


def _train(tiny_base, examples, out_dir, class_images=(), settings=None, **options):
    options = DreamBoothOptions(**{"class_prompt": CLASS_PROMPT, **options})
    cache = out_dir.parent / "latents"  # per test: the VAE encodes each image once, not once per run
    return train_dreambooth(tiny_base, examples, settings or loop_settings(), options, out_dir,
                            class_images=class_images, latent_cache=cache)


@pytest.mark.slow
def test_the_loss_falls_and_the_shared_unet_is_unchanged(tiny_base: BaseModel, examples, tmp_path: Path) -> None:
    """Against a control with the same draws and a negligible rate, as the textual-inversion test does: the
    per-step loss is dominated by its random timestep, the difference isolates what training did."""
    before = _weights(tiny_base.unet), _weights(tiny_base.text_encoder)
    trained = _train(tiny_base, examples, tmp_path / "trained", prior_preservation=False)
    control = _train(tiny_base, examples, tmp_path / "control", prior_preservation=False,
                        settings=loop_settings(learning_rate="1e-12"))
    assert trained.losses[0] == control.losses[0]
    improvement = np.array(control.losses[-4:]) - np.array(trained.losses[-4:])
    assert improvement.mean() > 0 and (improvement > 0).all()
    assert not _same(_weights(trained.unet), before[0]) and trained.finite
    assert _same(_weights(tiny_base.unet), before[0]) and _same(_weights(tiny_base.text_encoder), before[1])
    assert not any(p.requires_grad for p in tiny_base.unet.parameters())


@pytest.mark.slow
def test_prior_preservation_adds_the_class_term(tiny_base: BaseModel, examples, class_image_paths, tmp_path: Path) -> None:
    plain = _train(tiny_base, examples, tmp_path / "plain", prior_preservation=False,
                      settings=loop_settings(max_steps=2))
    weightless = _train(tiny_base, examples, tmp_path / "zero", class_image_paths, prior_loss_weight=0.0,
                           settings=loop_settings(max_steps=2))
    prior = _train(tiny_base, examples, tmp_path / "prior", class_image_paths,
                      settings=loop_settings(max_steps=2))
    again = _train(tiny_base, examples, tmp_path / "again", class_image_paths,
                      settings=loop_settings(max_steps=2))
    assert weightless.losses == plain.losses  # weight 0: no class term and no extra draws
    # Same instance draws at step 1; the class MSE of an untrained model on noise is about 1.
    assert prior.losses[0] - plain.losses[0] > 0.3
    assert again.losses == prior.losses  # the class draws come from the run's seeded generator
    with pytest.raises(ValueError, match="class images"):
        _train(tiny_base, examples, tmp_path / "none", ())


@pytest.mark.slow
def test_outputs_of_a_run_load_back(tiny_base: BaseModel, examples, class_image_paths, tmp_path: Path) -> None:
    out = tmp_path / "dreambooth"
    result = _train(tiny_base, examples, out, class_image_paths, train_text_encoder=True,
                            text_encoder_lr_scale=0.5, settings=loop_settings(max_steps=4, save_every=2))
    files = result.files
    assert files["diffusers"] == out / "sks" and files["single_file"] == out / "sks.safetensors"
    assert files["checkpoint_2_single_file"] == out / "checkpoints" / "sks-2.safetensors"
    assert files["checkpoint_2_single_file"].is_file() and files["loss_png"].is_file()
    assert not list((out / "checkpoints").glob("*/"))  # checkpoints are light: the single file only
    folder = StableDiffusionPipeline.from_pretrained(files["diffusers"], local_files_only=True)
    assert _same(_weights(folder.unet), _weights(result.unet))
    assert not _same(_weights(folder.unet), _weights(tiny_base.unet))
    assert not _same(_weights(folder.text_encoder), _weights(tiny_base.text_encoder))
    single = load_single_file_pipeline(files["single_file"], dtype=torch.float32)
    loaded, trained = _weights(single.unet), _weights(result.unet)
    assert all(torch.allclose(loaded[key], trained[key]) for key in trained)
    checkpoint = load_single_file_pipeline(files["checkpoint_2_single_file"], dtype=torch.float32,
                                           config_dir=files["diffusers"])
    assert not _same(_weights(checkpoint.unet), trained)


@pytest.mark.slow
def test_an_interrupted_run_resumes_to_the_same_weights(tiny_base: BaseModel, examples, class_image_paths, tmp_path: Path) -> None:
    from tests.training.conftest import stop_after

    settings = loop_settings(max_steps=4, save_every=2)
    options = DreamBoothOptions(class_prompt=CLASS_PROMPT, train_text_encoder=True)
    whole = train_dreambooth(tiny_base, examples, settings, options, tmp_path / "whole", class_images=class_image_paths)
    with pytest.raises(KeyboardInterrupt):
        train_dreambooth(tiny_base, examples, settings, options, tmp_path / "cut", class_images=class_image_paths,
                         progress=stop_after(2))
    resumed = train_dreambooth(tiny_base, examples, settings, options, tmp_path / "cut", class_images=class_image_paths)
    assert resumed.resumed_from == 2 and resumed.losses == whole.losses
    assert _same(_weights(resumed.unet), _weights(whole.unet))
    assert _same(_weights(resumed.text_encoder), _weights(whole.text_encoder))


def test_auto_optimizer_is_8bit_adamw_only_where_it_runs(monkeypatch) -> None:
    from training import optimizers

    def unavailable():
        raise optimizers.OptimizerUnavailableError("no bitsandbytes here")

    monkeypatch.setattr(optimizers, "_bitsandbytes_adamw8bit", unavailable)
    assert optimizers.available_adamw(torch.device("cpu")) == ("adamw", "no bitsandbytes here")
    monkeypatch.setattr(optimizers, "_bitsandbytes_adamw8bit", lambda: torch.optim.AdamW)  # one that can update
    assert optimizers.available_adamw(torch.device("cpu")) == ("adamw8bit", "")


def test_grid_cells_render_the_fine_tune_and_strength_zero_is_the_base_model(tiny_base: BaseModel, perturbed, tmp_path: Path) -> None:
    _, _, single = perturbed
    before = _weights(tiny_base.unet)
    pipeline = build_pipeline(tiny_base, "ddim")
    checkpoint = Checkpoint("dreambooth", 4, single, "sks", final=True)
    cells = [CellSpec(checkpoint, "a photo of [name]", 1, 7.0, 2, strength) for strength in (1.0, 0.0)]
    tuned, zero = render_cells(pipeline, cells, RenderSettings(sampler="ddim"), tmp_path / "cells")
    with torch.no_grad():
        conditioning = prompt_embeddings(pipeline, "a photo of sks", 1)
        negative = prompt_embeddings(pipeline, "", 1)
    base_image = render_conditioned(pipeline, conditioning, negative, 1, 2, 7.0)
    pixels = {name: np.asarray(Image.open(cell.cache_path)) for name, cell in (("tuned", tuned), ("zero", zero))}
    assert np.array_equal(pixels["zero"], np.asarray(base_image))
    assert not np.array_equal(pixels["tuned"], pixels["zero"])
    assert _same(_weights(tiny_base.unet), before)


def test_a_caption_that_truncates_the_instance_token_is_named(tiny_base: BaseModel, examples, tmp_path: Path) -> None:
    from training.dreambooth import DreamBoothMethod
    from training.training_loop import TrainingExample

    long = TrainingExample(examples[0].image_path, ", ".join(["red"] * 90))
    template = tmp_path / "tags_first.txt"
    template.write_text("[filewords], a photo of [name]\n")
    with pytest.raises(ValueError, match=r"00\.png: the instance token 'sks' does not survive"):
        _train(tiny_base, [long, *examples[1:]], tmp_path / "long", prior_preservation=False,
               settings=loop_settings(template=str(template), max_steps=1))
    # With [name] before [filewords] it survives however long the caption is.
    method = DreamBoothMethod(tiny_base, loop_settings(), DreamBoothOptions(prior_preservation=False))
    method.check_prompts([long, *examples], ["a photo of [name], [filewords]"])
