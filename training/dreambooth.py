"""DreamBooth: a full fine-tune of the UNet (and optionally the text encoder) on the instance images, with
prior preservation against the base model's own class images (Ruiz et al. 2022; diffusers'
examples/dreambooth/train_dreambooth.py).

Why a method of the shared loop: latents, templates, caption augmentation, checkpoints, resume, NaN guard,
validation loss, previews and loss curves are the textual-inversion loop's (training/training_loop.py); this
module only says what is trained (a COPY of the UNet, so the cached base model stays bit-identical), how the
loss adds the class term, and which files come out: a diffusers folder and a single original-layout
`.safetensors` a webui user drops into models/Stable-diffusion.

Prior preservation follows diffusers: every micro-batch is the instance latents plus as many class latents
(drawn with the run's generator from the class images' cached latent distributions), one UNet call on both,
loss = MSE(instance) + prior_loss_weight * MSE(class).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import diffusers
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel

from common.atomic import atomic_folder
from common.hashing import file_sha256
from training.base_model import BaseModel
from training.clip_tokenizer_files import write_tokenizer_of
from training.diffusion_objective import noise_scheduler, prediction_target
from training.latent_cache import latent_distributions, sample_latents
from training.single_file import save_single_file

CHECKPOINTS_DIR = "checkpoints"


@dataclass(frozen=True)
class DreamBoothOptions:
    """What DreamBooth adds to the loop's settings (dataset.yaml `dreambooth:`)."""

    class_prompt: str = ""  # the class images' prompt, also the prior-preservation prompt
    prior_preservation: bool = True
    prior_loss_weight: float = 1.0
    train_text_encoder: bool = False
    text_encoder_lr_scale: float = 1.0  # the text encoder's rate = this x the UNet's scheduled rate

    def __post_init__(self) -> None:
        if self.prior_loss_weight < 0:
            raise ValueError(f"prior_loss_weight must be at least 0, got {self.prior_loss_weight}")
        if self.text_encoder_lr_scale <= 0:
            raise ValueError(f"the text encoder's learning rate must be above 0 (scale {self.text_encoder_lr_scale})")
        if self.prior_preservation and not self.class_prompt.strip():
            raise ValueError("prior preservation needs a class prompt, e.g. 'a photo of a dog'")

    @property
    def uses_class_images(self) -> bool:
        return self.prior_preservation and self.prior_loss_weight > 0


def trainable_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy with gradients on, in train mode: the original (the shared base model) is not touched."""
    clone = copy.deepcopy(module)
    clone.requires_grad_(True)
    clone.train()
    return clone


def save_diffusers_folder(
    base: BaseModel, unet: UNet2DConditionModel, text_encoder: CLIPTextModel, folder: Path
) -> Path:
    """A complete diffusers StableDiffusionPipeline folder with the given UNet and text encoder (the base model's
    VAE, tokenizer and scheduler), written to a staging folder and renamed into place."""
    scheduler_class = getattr(diffusers, base.scheduler_config.get("_class_name", "PNDMScheduler"))
    pipeline = StableDiffusionPipeline(
        vae=base.vae, text_encoder=text_encoder, tokenizer=base.tokenizer, unet=unet,
        scheduler=scheduler_class.from_config(base.scheduler_config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    with atomic_folder(folder) as staging:
        pipeline.save_pretrained(staging, safe_serialization=True)
        write_tokenizer_of(base.tokenizer, staging / "tokenizer")
    return Path(folder)


def class_latents(
    base: BaseModel, class_images: Sequence[Path], instance_shape: tuple[int, ...], latent_cache: Path | None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(mean, std, encoded) of the class images through the shared latent cache; their latents must have the
    instance latents' shape, since both go through the UNet in one batch."""
    mean, std, encoded = latent_distributions(base.vae, list(class_images), base.vae_scale_factor, latent_cache)
    if tuple(mean.shape[1:]) != tuple(instance_shape):
        raise ValueError(
            f"{class_images[0]}: class images give latents of shape {tuple(mean.shape[1:])}, the training images "
            f"{tuple(instance_shape)}: generate the class images at the training resolution"
        )
    return mean, std, encoded
