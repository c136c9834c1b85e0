"""Validation loss on held-out images, comparable from one checkpoint to the next.

Why fixed draws: the training loss of one step is dominated by its random timestep and noise, so two
checkpoints can only be compared on the same samples. Each validation image gets one timestep, one noise
tensor and one template line, drawn once from a generator of its own (seeded independently of training, so
computing the loss never moves the training random stream, and a resumed run draws the same set), and its
latents are the VAE distribution's mean from the shared latent cache. The loss is the same MSE against the
same target rule (epsilon / v_prediction) that training minimises, computed without gradients in eval mode.

Any method can use it: it takes the UNet to call and a callable that turns prompts into conditioning
(textual inversion passes its placeholder-vector encoder; a hypernetwork or LoRA would pass its own).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler

from common.hashing import file_sha256, json_sha256
from training.acceleration import autocast
from training.diffusion_objective import prediction_target
from training.latent_cache import latent_distributions
from training.templates import render_prompt

# Fixed rather than the training seed: runs with different seeds are then scored on the same samples too.
VALIDATION_SEED = 8_150_117


class CaptionedImage(Protocol):
    image_path: Path
    filewords: str


@dataclass(frozen=True)
class ValidationSet:
    """Everything random about the validation loss, drawn once: the same tensors at every evaluation."""

    latents: torch.Tensor  # (N, C, h, w) float32 on CPU: the latent distributions' means
    noise: torch.Tensor  # (N, C, h, w) float32 on CPU
    timesteps: torch.Tensor  # (N,) int64
    prompts: tuple[str, ...]  # a template line with [name] and [filewords] filled in, per image
    key: str  # identifies images, prompts and draws: losses computed under another key are not comparable
    encoded: int = 0  # images the VAE encoded to build it (latent cache misses)

    def __len__(self) -> int:
        return len(self.prompts)


def build_validation_set(
    vae: AutoencoderKL,
    vae_scale_factor: int,
    examples: Sequence[CaptionedImage],
    lines: Sequence[str],
    name: str,
    num_train_timesteps: int,
    latent_cache: Path | None = None,
    seed: int = VALIDATION_SEED,
) -> ValidationSet:
    """Fix the samples the validation loss is measured on; `lines` are the training template's lines."""
    if not examples:
        raise ValueError("a validation set needs at least one image")
    if not lines:
        raise ValueError("a validation set needs at least one template line")
    paths = [Path(example.image_path) for example in examples]
    means, _, encoded = latent_distributions(vae, paths, vae_scale_factor, latent_cache)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(means.shape, generator=generator, dtype=torch.float32)
    timesteps = torch.randint(num_train_timesteps, (len(examples),), generator=generator)
    picks = torch.randint(len(lines), (len(examples),), generator=generator).tolist()
    prompts = tuple(render_prompt(lines[pick], name, example.filewords) for pick, example in zip(picks, examples))
    key = json_sha256({"images": [file_sha256(path) for path in paths], "prompts": prompts, "seed": seed,
                       "timesteps": timesteps.tolist(), "latent_shape": list(means.shape)})
    return ValidationSet(latents=means, noise=noise, timesteps=timesteps, prompts=prompts, key=key, encoded=encoded)


@contextlib.contextmanager
def _eval_mode(modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Eval mode for the duration (no dropout), then each module's own mode back."""
    modes = [module.training for module in modules]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for module, mode in zip(modules, modes):
            module.train(mode)


def validation_loss(
    validation: ValidationSet,
    unet: torch.nn.Module,
    encode: Callable[[list[str]], torch.Tensor],
    scheduler: DDPMScheduler,
    *,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int = 1,
    compute_dtype: torch.dtype | None = None,
    eval_modules: Sequence[torch.nn.Module] = (),
) -> float:
    """The mean per-image MSE between the UNet's prediction and the training target over the validation set.

    `encode(prompts)` returns the (batch, tokens, hidden) conditioning; `eval_modules` are put in eval mode
    beside the UNet (e.g. the text encoder). Batching does not change which samples are scored.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    total = 0.0
    with torch.no_grad(), _eval_mode([unet, *eval_modules]):
        for start in range(0, len(validation), batch_size):
            window = slice(start, start + batch_size)
            latents = validation.latents[window].to(device=device, dtype=dtype)
            noise = validation.noise[window].to(device=device, dtype=dtype)
            timesteps = validation.timesteps[window].to(device)
            noisy = scheduler.add_noise(latents, noise, timesteps)
            target = prediction_target(scheduler, latents, noise, timesteps)
            with autocast(device, compute_dtype):
                conditioning = encode(list(validation.prompts[window]))
                prediction = unet(noisy, timesteps, encoder_hidden_states=conditioning).sample
            errors = F.mse_loss(prediction.float(), target.float(), reduction="none")
            total += errors.flatten(1).mean(dim=1).sum().item()
    return total / len(validation)
