"""Loading a Stable Diffusion 1.x base model from local files only, frozen, on the chosen device.

Why one loader: the embedded tiny model and a user's real SD 1.5 go through the same code, so the tests
on the tiny model exercise what users run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from common.hashing import cached_file_sha256, tree_sha256

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


class BaseModelError(ValueError):
    """A base model path that cannot be loaded; the message names the path and what is wrong."""


@dataclass
class BaseModel:
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    scheduler_config: dict[str, Any]
    source: Path
    name: str  # what the webui calls sd_checkpoint_name
    fingerprint: str  # sha256 of the weights; its first 10 characters are the webui's sd_checkpoint
    device: torch.device
    dtype: torch.dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """The image side the UNet was built for (512 for SD 1.5)."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def short_hash(self) -> str:
        return self.fingerprint[:10]


def model_fingerprint(path: str | Path) -> str:
    """Content hash of a model file or folder (memoised per file, since SD checkpoints are GBs)."""
    root = Path(path)
    if root.is_file():
        return cached_file_sha256(root)
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    return tree_sha256(files, root)


def _load_pipeline(path: Path, dtype: torch.dtype) -> StableDiffusionPipeline:
    common = dict(dtype=dtype, local_files_only=True, safety_checker=None, requires_safety_checker=False)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise BaseModelError(f"{path}: not a diffusers model folder (no model_index.json)")
        return StableDiffusionPipeline.from_pretrained(path, **common)
    if path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        from training.single_file import load_single_file_pipeline

        return load_single_file_pipeline(path, dtype=dtype)
    raise BaseModelError(f"{path}: expected a diffusers folder or a {'/'.join(SINGLE_FILE_SUFFIXES)} file")


def load_base_model(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> BaseModel:
    """Load every component frozen and in eval mode: training code opts in to gradients where it needs them."""
    path = Path(path)
    if not path.exists():
        raise BaseModelError(f"{path}: base model not found")
    pipeline = _load_pipeline(path, dtype)
    device = torch.device(device)
    for module in (pipeline.text_encoder, pipeline.vae, pipeline.unet):
        module.requires_grad_(False)
        module.eval()
        module.to(device)
    return BaseModel(
        tokenizer=pipeline.tokenizer,
        text_encoder=pipeline.text_encoder,
        vae=pipeline.vae,
        unet=pipeline.unet,
        scheduler_config=dict(pipeline.scheduler.config),
        source=path,
        name=path.stem if path.is_file() else path.name,
        fingerprint=model_fingerprint(path),
        device=device,
        dtype=dtype,
    )
