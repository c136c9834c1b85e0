"""Preview images during training, as the webui's "save an image every N steps".

Why a preview encodes its prompt with the training method's own encoder (for textual inversion, the learned
vectors spliced into the prompt) instead of loading the result into the pipeline: loading modifies the shared
tokenizer and text encoder; the training code path shows exactly what the step trained. Each preview draws its noise from its
own generator seeded with preview_seed, so previews never advance the training generator and a run with
previews ends with the same vectors as one without. preview_seed -1 (the webui's "random") draws each seed
from the operating system, never from the training generator, and the seed is written into the PNG's
`parameters` text the way the webui writes its infotext, so any preview can be reproduced.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from PIL import Image, PngImagePlugin

from common.atomic import write_bytes
from training.base_model import BaseModel
from training.evaluation import SAMPLERS, build_pipeline, prompt_embeddings, render_conditioned
from training.png_embedding import save_png_embedding
from training.templates import render_prompt

IMAGES_DIR = "images"  # the webui's folder names under the embedding's log directory
IMAGE_EMBEDDINGS_DIR = "image_embeddings"
Encoder = Callable[[list[str]], torch.Tensor]  # prompts -> (batch, tokens, hidden) conditioning
WEBUI_SAMPLER_NAMES = {"ddim": "DDIM", "dpm": "DPM++ 2M", "euler": "Euler", "euler_a": "Euler a", "pndm": "PLMS"}


@dataclass(frozen=True)
class PreviewSettings:
    every: int = 0  # webui: create_image_every (0: no previews)
    prompt: str = ""  # "" = the training prompt of that step; [name] is substituted
    negative_prompt: str = ""
    seed: int = 0  # -1: a new random seed for each preview (webui)
    steps: int = 20
    cfg_scale: float = 7.0
    sampler: str = "euler_a"  # the webui's default sampler, Euler a

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError(f"create_image_every must be at least 0, got {self.every}")
        if self.steps < 1:
            raise ValueError(f"preview_steps must be at least 1, got {self.steps}")
        if self.cfg_scale < 0:
            raise ValueError(f"preview_cfg_scale must be at least 0, got {self.cfg_scale}")
        if self.seed < -1:
            raise ValueError(f"preview_seed must be -1 (random) or at least 0, got {self.seed}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"preview_sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")


class PreviewRenderer:
    """Renders and saves the previews of one run over the shared, frozen base model."""

    def __init__(
        self, base: BaseModel, settings: PreviewSettings, name: str, clip_skip: int, unet: torch.nn.Module | None = None
    ) -> None:
        """unet: the UNet being trained when it is not the base model's own (a fine-tuned copy)."""
        self.base, self.settings, self.name, self.clip_skip = base, settings, name, clip_skip
        self.pipeline: StableDiffusionPipeline = build_pipeline(base, settings.sampler)
        if unet is not None and unet is not base.unet:
            self.pipeline.unet = unet

    def prompt_for(self, training_prompt: str) -> str:
        return render_prompt(self.settings.prompt, self.name, "") if self.settings.prompt else training_prompt

    def seed_for_next(self) -> int:
        """The fixed preview seed, or for -1 a fresh one that leaves every torch generator untouched."""
        return self.settings.seed if self.settings.seed >= 0 else random.SystemRandom().randrange(2**32)

    def infotext(self, prompt: str, seed: int, width: int, height: int) -> str:
        """The webui's generation-parameters text, so the preview's settings travel with the image."""
        lines = [prompt]
        if self.settings.negative_prompt:
            lines.append(f"Negative prompt: {self.settings.negative_prompt}")
        lines.append(
            f"Steps: {self.settings.steps}, Sampler: {WEBUI_SAMPLER_NAMES[self.settings.sampler]}, "
            f"CFG scale: {self.settings.cfg_scale:g}, Seed: {seed}, Size: {width}x{height}, "
            f"Model hash: {self.base.short_hash}, Clip skip: {self.clip_skip}"
        )
        return "\n".join(lines)

    @torch.no_grad()
    def render(self, encode: Encoder, prompt: str, seed: int | None = None) -> Image.Image:
        """encode: the method's prompt encoding (the training code path, so a preview shows what was trained)."""
        conditioning = encode([prompt])
        negative = prompt_embeddings(self.pipeline, self.settings.negative_prompt, self.clip_skip)
        return render_conditioned(
            self.pipeline, conditioning.to(self.base.dtype), negative.to(self.base.dtype),
            self.settings.seed if seed is None else seed, self.settings.steps, self.settings.cfg_scale,
        )  # fmt: skip

    def save(
        self, encode: Encoder, training_prompt: str, step: int, out_dir: Path, embedding: dict[str, Any] | None = None
    ) -> dict[str, Path]:
        """`images/<name>-<step>.png` and, given the webui embedding data (save_image_with_stored_embedding),
        `image_embeddings/<name>-<step>.png` carrying it (the webui's layout)."""
        prompt, seed = self.prompt_for(training_prompt), self.seed_for_next()
        image = self.render(encode, prompt, seed)
        files = preview_files(out_dir, self.name, step, embedding is not None)
        write_bytes(files[f"preview_{step}"], _png_bytes(image, self.infotext(prompt, seed, *image.size)))
        if embedding is not None:
            save_png_embedding(files[f"preview_{step}_embedding"], image, embedding)
        return files


def preview_files(out_dir: Path, name: str, step: int, with_embedding: bool) -> dict[str, Path]:
    files = {f"preview_{step}": out_dir / IMAGES_DIR / f"{name}-{step}.png"}
    if with_embedding:
        files[f"preview_{step}_embedding"] = out_dir / IMAGE_EMBEDDINGS_DIR / f"{name}-{step}.png"
    return files


def _png_bytes(image: Image.Image, parameters: str) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()
