from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch

from training.base_model import BaseModel
from training.latent_cache import latent_distributions, load_training_image, vae_fingerprint
from training.textual_inversion import TextualInversionSettings, train_textual_inversion


def test_the_vae_runs_once_per_image_across_runs_and_seeds(tiny_base: BaseModel, subject_examples, tmp_path: Path) -> None:
    cache, examples = tmp_path / "cache", subject_examples[:4]
    run = TextualInversionSettings(name="mycat", max_steps=2)
    first = train_textual_inversion(tiny_base, examples, run, tmp_path / "a", latent_cache=cache)
    second = train_textual_inversion(tiny_base, examples, dataclasses.replace(run, seed=5), tmp_path / "b", latent_cache=cache)
    again = train_textual_inversion(tiny_base, examples, run, tmp_path / "c", latent_cache=cache)
    uncached = train_textual_inversion(tiny_base, examples, run, tmp_path / "d")
    assert (first.images_encoded, second.images_encoded, again.images_encoded) == (4, 0, 0)
    assert torch.equal(first.vectors, again.vectors) and torch.equal(first.vectors, uncached.vectors)
    assert len(list(cache.rglob("*.safetensors"))) == 4


def test_cached_distributions_are_the_vaes_and_keyed_by_its_weights(tiny_base: BaseModel, subject_examples, tmp_path: Path) -> None:
    paths = [example.image_path for example in subject_examples[:3]]
    mean, std, encoded = latent_distributions(tiny_base.vae, paths, tiny_base.vae_scale_factor, tmp_path)
    pixels = torch.stack([load_training_image(path, tiny_base.vae_scale_factor) for path in paths])
    with torch.no_grad():
        direct = tiny_base.vae.encode(pixels).latent_dist
    scale = tiny_base.vae.config.scaling_factor
    assert encoded == 3
    assert torch.allclose(mean, direct.mean * scale, atol=1e-6) and torch.allclose(std, direct.std * scale, atol=1e-6)
    cached_mean, cached_std, encoded = latent_distributions(tiny_base.vae, paths, tiny_base.vae_scale_factor, tmp_path)
    assert encoded == 0 and torch.equal(cached_mean, mean) and torch.equal(cached_std, std)

    other_vae = copy.deepcopy(tiny_base.vae)
    with torch.no_grad():
        next(other_vae.parameters()).add_(0.01)
    assert vae_fingerprint(other_vae) != vae_fingerprint(tiny_base.vae)
    other_mean, _, encoded = latent_distributions(other_vae, paths, tiny_base.vae_scale_factor, tmp_path)
    assert encoded == 3 and not torch.equal(other_mean, mean)


def test_latent_sampling_methods(tiny_base: BaseModel, subject_examples, tmp_path: Path, monkeypatch) -> None:
    """deterministic uses the mean, once one draw per run, random a new draw per use (as in the webui)."""
    from training import training_loop

    seen: dict[str, list[torch.Tensor]] = {}
    original = training_loop._Trainer.latents_for

    def record(self, indices):
        latents = original(self, indices)
        seen.setdefault(self.settings.latent_sampling_method, []).append(latents.clone())
        return latents

    monkeypatch.setattr(training_loop._Trainer, "latents_for", record)
    example = subject_examples[:1]
    mean, _, _ = latent_distributions(tiny_base.vae, [example[0].image_path], tiny_base.vae_scale_factor, None)
    for method in ("deterministic", "once", "random"):
        run = TextualInversionSettings(name="mycat", max_steps=3, latent_sampling_method=method)
        train_textual_inversion(tiny_base, example, run, tmp_path / method)
    assert all(torch.equal(latents, mean) for latents in seen["deterministic"])
    assert all(torch.equal(latents, seen["once"][0]) for latents in seen["once"]) and not torch.equal(seen["once"][0], mean)
    assert not torch.equal(seen["random"][0], seen["random"][1])
    with pytest.raises(ValueError, match="latent_sampling_method must be one of once, deterministic, random"):
        TextualInversionSettings(name="mycat", latent_sampling_method="sometimes")
