"""On-disk cache of VAE latent distributions, keyed by (image hash, VAE fingerprint, size).

Why cache the distribution (mean and std) rather than a sample: the webui's three latent sampling
methods all derive from it (`deterministic` takes the mean, `once` draws one sample per run, `random`
draws a new sample each time the image is used), so the VAE encoder runs once per image across every
run, seed and dataset that shares the image and the VAE, and never during training steps.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from diffusers import AutoencoderKL
from PIL import Image, UnidentifiedImageError

from common.atomic import atomic_path
from common.hashing import file_sha256

LATENT_SAMPLING_METHODS = ("once", "deterministic", "random")
_ENCODE_BATCH = 4


def vae_fingerprint(vae: AutoencoderKL) -> str:
    """sha256 over the VAE's weights (names, dtypes, bytes): the same VAE inside two checkpoints shares a cache."""
    digest = hashlib.sha256()
    for key, tensor in sorted(vae.state_dict().items()):
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_training_image(path: Path, multiple: int) -> torch.Tensor:
    """(3, S, S) in [-1, 1], the VAE's input range; bad files fail here with the file named."""
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as error:
        raise ValueError(f"{path}: cannot read the training image ({error})") from error
    if rgb.width != rgb.height or rgb.width % multiple:
        raise ValueError(f"{path}: training images must be square with a side divisible by {multiple}, got {rgb.size}")
    pixels = torch.from_numpy(np.asarray(rgb, dtype=np.float32)).permute(2, 0, 1)
    return pixels / 127.5 - 1.0


def _check_sides(paths: Sequence[Path], images: list[torch.Tensor], side: int) -> None:
    for path, image in zip(paths, images):
        if image.shape[-1] != side:
            raise ValueError(f"{path}: all training images must be {side}x{side}, got {image.shape[-1]}")


@torch.no_grad()
def _encode(vae: AutoencoderKL, images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled (mean, std) in float32 on CPU: the scaling factor applies to both, as it does to a sample."""
    parameter = next(vae.parameters())
    pixels = torch.stack(images).to(device=parameter.device, dtype=parameter.dtype)
    distribution = vae.encode(pixels).latent_dist
    scale = vae.config.scaling_factor
    return (distribution.mean * scale).float().cpu(), (distribution.std * scale).float().cpu()


def latent_distributions(
    vae: AutoencoderKL, image_paths: Sequence[Path], multiple: int, cache_dir: Path | None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(mean, std, encoded) for every image, each (N, C, h, w) float32 on CPU; `encoded` counts cache misses.

    With cache_dir None nothing is stored (the VAE still runs once per image, not per step).
    """
    images = [load_training_image(Path(path), multiple) for path in image_paths]
    side = images[0].shape[-1]
    _check_sides(image_paths, images, side)
    folder = None if cache_dir is None else Path(cache_dir) / vae_fingerprint(vae)[:32]
    files = [None if folder is None else folder / f"{file_sha256(path)}-{side}.safetensors" for path in image_paths]
    found: dict[int, dict[str, torch.Tensor]] = {
        index: safetensors.torch.load_file(file) for index, file in enumerate(files) if file is not None and file.is_file()
    }
    missing = [index for index in range(len(images)) if index not in found]
    for start in range(0, len(missing), _ENCODE_BATCH):
        chunk = missing[start : start + _ENCODE_BATCH]
        mean, std = _encode(vae, [images[index] for index in chunk])
        for row, index in enumerate(chunk):
            found[index] = {"mean": mean[row].contiguous(), "std": std[row].contiguous()}
            if files[index] is not None:
                files[index].parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(files[index]) as tmp:
                    safetensors.torch.save_file(found[index], str(tmp))
    means = torch.stack([found[index]["mean"] for index in range(len(images))])
    stds = torch.stack([found[index]["std"] for index in range(len(images))])
    return means, stds, len(missing)


def sample_latents(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One draw from N(mean, std^2) with our generator (CPU draws, so a seed gives the same bytes anywhere)."""
    return mean + std * torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
