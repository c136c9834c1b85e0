"""Preview images during training: where they go, what they carry, and that they never change the training."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.training.conftest import stop_after
from training.base_model import BaseModel
from training.embedding_formats import load_embedding, read_embedding
from training.previews import Encoder, PreviewRenderer, PreviewSettings
from training.prompt_encoding import encode_with_vectors
from training.textual_inversion import TextualInversionSettings, train_textual_inversion


def encoder(base: BaseModel, vectors: torch.Tensor, clip_skip: int = 1) -> Encoder:
    return lambda prompts: encode_with_vectors(base.tokenizer, base.text_encoder, prompts, "mycat", vectors, clip_skip)


def run_settings(**overrides) -> TextualInversionSettings:
    values = dict(
        name="mycat", vectors_per_token=2, learning_rate="0.02", max_steps=4, batch_size=2, save_every=2,
        shuffle_tags=True, tag_dropout=0.2, latent_sampling_method="random",
        previews=PreviewSettings(every=2, steps=2, seed=7, sampler="euler_a"),
    )  # fmt: skip
    return TextualInversionSettings(**{**values, **overrides})


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_previews_are_written_with_the_embedding_of_their_step(tiny_base: BaseModel, subject_examples, tmp_path: Path) -> None:
    result = train_textual_inversion(tiny_base, subject_examples[:4], run_settings(), tmp_path)
    previews = {key for key in result.files if key.startswith("preview_")}
    assert previews == {"preview_2", "preview_2_embedding", "preview_4", "preview_4_embedding"}
    assert result.files["preview_2"] == tmp_path / "images" / "mycat-2.png"
    assert result.files["preview_4_embedding"] == tmp_path / "image_embeddings" / "mycat-4.png"
    side = tiny_base.resolution
    assert _pixels(result.files["preview_2"]).shape == (side, side, 3)
    for step in (2, 4):  # the PNG carries the vectors of its step, the same as that step's checkpoint
        carried = read_embedding(result.files[f"preview_{step}_embedding"])
        assert carried.step == step and carried.name == "mycat"
        assert torch.equal(carried.vectors, load_embedding(result.files[f"checkpoint_{step}_webui_pt"])[1])
    assert torch.equal(read_embedding(result.files["preview_4_embedding"]).vectors, result.vectors)

    without = train_textual_inversion(
        tiny_base, subject_examples[:4], run_settings(previews=PreviewSettings()), tmp_path / "without"
    )
    assert torch.equal(without.vectors, result.vectors) and without.losses == result.losses  # the training RNG is untouched
    assert not any(key.startswith("preview_") for key in without.files)

    plain = run_settings(save_image_with_stored_embedding=False)
    again = train_textual_inversion(tiny_base, subject_examples[:4], plain, tmp_path / "again")
    assert {key for key in again.files if key.startswith("preview_")} == {"preview_2", "preview_4"}
    assert again.files["preview_4"].read_bytes() == result.files["preview_4"].read_bytes()  # fixed preview seed


def test_previews_follow_the_vectors_the_prompt_and_the_seed(tiny_base: BaseModel) -> None:
    settings = PreviewSettings(every=1, steps=2, seed=3, prompt="a photo of [name]", sampler="ddim")
    renderer = PreviewRenderer(tiny_base, settings, "mycat", clip_skip=1)
    assert renderer.prompt_for("training prompt of mycat") == "a photo of mycat"
    assert PreviewRenderer(tiny_base, PreviewSettings(), "mycat", 1).prompt_for("mycat, red") == "mycat, red"
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    first = np.asarray(renderer.render(encoder(tiny_base, vectors), "a photo of mycat"))
    assert np.array_equal(first, np.asarray(renderer.render(encoder(tiny_base, vectors), "a photo of mycat")))
    assert not np.array_equal(first, np.asarray(renderer.render(encoder(tiny_base, vectors * 3), "a photo of mycat")))
    reseeded = PreviewRenderer(tiny_base, dataclasses.replace(settings, seed=4), "mycat", 1)
    assert not np.array_equal(first, np.asarray(reseeded.render(encoder(tiny_base, vectors), "a photo of mycat")))


def test_a_resumed_run_with_previews_ends_identical(tiny_base: BaseModel, subject_examples, tmp_path: Path) -> None:
    settings = run_settings(max_steps=5, save_image_with_stored_embedding=False, previews=PreviewSettings(every=1, steps=1))
    whole = train_textual_inversion(tiny_base, subject_examples[:4], settings, tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        train_textual_inversion(tiny_base, subject_examples[:4], settings, tmp_path / "cut", progress=stop_after(3))
    resumed = train_textual_inversion(tiny_base, subject_examples[:4], settings, tmp_path / "cut")
    assert resumed.resumed_from == 2
    assert torch.equal(resumed.vectors, whole.vectors) and resumed.losses == whole.losses
    assert set(resumed.files) == set(whole.files)
    for step in range(1, 6):
        key = f"preview_{step}"
        assert resumed.files[key].read_bytes() == whole.files[key].read_bytes(), key


def test_a_random_preview_seed_is_recorded_in_the_webui_parameters_and_reproduces(
    tiny_base: BaseModel, tmp_path: Path
) -> None:
    settings = PreviewSettings(every=1, steps=2, seed=-1, sampler="euler_a", negative_prompt="blurry")
    renderer = PreviewRenderer(tiny_base, settings, "mycat", clip_skip=2)
    vectors = torch.randn(1, 32, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    seeds = []
    for step in (1, 2):
        path = renderer.save(encoder(tiny_base, vectors, clip_skip=2), "a photo of mycat", step, tmp_path)[f"preview_{step}"]
        with Image.open(path) as image:
            parameters = image.text["parameters"]
        prompt, negative, details = parameters.split("\n")
        assert (prompt, negative) == ("a photo of mycat", "Negative prompt: blurry")
        assert "Steps: 2, Sampler: Euler a, CFG scale: 7," in details and "Clip skip: 2" in details
        seed = int(re.search(r"Seed: (\d+),", details).group(1))
        seeds.append(seed)
        assert np.array_equal(_pixels(path), np.asarray(renderer.render(encoder(tiny_base, vectors, clip_skip=2), "a photo of mycat", seed)))
    assert seeds[0] != seeds[1]  # a 1-in-2**32 chance of a false failure
    assert torch.equal(torch.get_rng_state(), before)  # the global torch generator was not used


def test_bad_preview_settings_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="preview_seed must be -1"):
        PreviewSettings(seed=-2)
    with pytest.raises(ValueError, match="preview_sampler must be one of"):
        PreviewSettings(sampler="heun")
    with pytest.raises(ValueError, match="preview_steps must be at least 1"):
        PreviewSettings(steps=0)
    with pytest.raises(ValueError, match="create_image_every must be at least 0"):
        PreviewSettings(every=-1)
