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
from collections.abc import Callable, Iterator, Sequence
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
from training.acceleration import autocast
from training.base_model import BaseModel
from training.clip_tokenizer_files import write_tokenizer_of
from training.diffusion_objective import noise_scheduler, prediction_target
from training.latent_cache import latent_distributions, sample_latents
from training.prompt_encoding import encode_input_ids
from training.single_file import save_single_file
from training.templates import NAME_KEYWORD, render_prompt
from training.training_loop import Batch, LoopResult, LoopSettings, TrainingExample, TrainingMethod, run_training

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


class DreamBoothMethod(TrainingMethod):
    """The loop's hooks for DreamBooth: a trainable copy of the UNet (and of the text encoder when trained),
    the prior-preservation loss, and single-file checkpoints plus a diffusers folder at the end."""

    label = "dreambooth"

    def __init__(
        self,
        base: BaseModel,
        settings: LoopSettings,
        options: DreamBoothOptions,
        class_images: Sequence[Path] = (),
        latent_cache: Path | None = None,
    ) -> None:
        if options.uses_class_images and not class_images:
            raise ValueError("prior preservation needs class images: materialize class_images for this dataset first")
        self.base, self.settings, self.options = base, settings, options
        self.class_images = [Path(path) for path in class_images] if options.uses_class_images else []
        self.latent_cache = latent_cache
        self.scheduler = noise_scheduler(base)
        self.unet: UNet2DConditionModel | None = None  # the trainable copy, while and after the run
        self.text_encoder = trainable_copy(base.text_encoder) if options.train_text_encoder else base.text_encoder
        self.class_encoded = 0  # class images the VAE encoded (latent cache misses)
        self._class_latents: tuple[torch.Tensor, torch.Tensor] | None = None

    @contextmanager
    def trained_unet(self, unet: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """A trainable deep copy: the shared base UNet is never modified (it is cached and reused)."""
        if self.unet is None:
            self.unet = trainable_copy(unet)
        yield self.unet

    def train_modules(self) -> list[torch.nn.Module]:
        return [self.unet] + ([self.text_encoder] if self.options.train_text_encoder else [])

    def parameter_groups(self) -> list[dict]:
        groups: list[dict] = [{"params": [p for p in self.unet.parameters() if p.requires_grad]}]
        if self.options.train_text_encoder:
            groups.append({"params": list(self.text_encoder.parameters()), "lr_scale": self.options.text_encoder_lr_scale})
        return groups

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Plain prompts through the (trained or frozen) text encoder; the instance token is an ordinary word."""
        tokenizer = self.base.tokenizer
        ids = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.options.train_text_encoder):
            return encode_input_ids(self.text_encoder, ids, self.settings.clip_skip)

    def check_prompts(self, examples: Sequence[TrainingExample], lines: list[str]) -> None:
        """Fail before training, naming the image, when a caption pushes the instance token past CLIP's 77 tokens
        (it would be truncated away, and that image would train the class, not the instance)."""
        tokenizer = self.base.tokenizer
        token_ids = tokenizer(self.settings.name, add_special_tokens=False).input_ids
        name_lines = [line for line in lines if NAME_KEYWORD in line]
        for example in examples:
            for line in name_lines:
                prompt = render_prompt(line, self.settings.name, example.filewords)
                ids = tokenizer(prompt, max_length=tokenizer.model_max_length, truncation=True).input_ids
                if not _contains(ids, token_ids):
                    raise ValueError(
                        f"{example.image_path}: the instance token {self.settings.name!r} does not survive CLIP's "
                        f"{tokenizer.model_max_length}-token limit in the prompt {prompt[:80]!r}...; shorten the "
                        "caption or put [name] earlier in the template"
                    )

    def _class_distributions(self, instance_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        if self._class_latents is None:
            mean, std, self.class_encoded = class_latents(self.base, self.class_images, instance_shape, self.latent_cache)
            self._class_latents = (mean, std)
        return self._class_latents

    def loss(self, batch: Batch, unet: torch.nn.Module) -> torch.Tensor:
        """Instance MSE, plus prior_loss_weight x the class MSE on as many class images, in one UNet call."""
        if not self.options.uses_class_images:
            return super().loss(batch, unet)
        count = len(batch.prompts)
        mean, std = self._class_distributions(tuple(batch.latents.shape[1:]))
        chosen = torch.randint(len(self.class_images), (count,), generator=batch.generator)
        if self.settings.latent_sampling_method == "deterministic":
            latents = mean[chosen]
        else:
            latents = sample_latents(mean[chosen], std[chosen], batch.generator)
        noise = torch.randn(latents.shape, generator=batch.generator)
        timesteps = torch.randint(self.scheduler.config.num_train_timesteps, (count,), generator=batch.generator)
        latents, noise = (tensor.to(device=batch.latents.device, dtype=batch.latents.dtype) for tensor in (latents, noise))
        timesteps = timesteps.to(batch.latents.device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        target = prediction_target(self.scheduler, latents, noise, timesteps)
        with autocast(batch.latents.device, batch.compute_dtype):
            conditioning = self.encode(list(batch.prompts) + [self.options.class_prompt] * count)
            prediction = unet(
                torch.cat([batch.noisy, noisy]), torch.cat([batch.timesteps, timesteps]), encoder_hidden_states=conditioning
            ).sample
        instance, prior = prediction.float().chunk(2)
        return F.mse_loss(instance, batch.target.float()) + self.options.prior_loss_weight * F.mse_loss(
            prior, target.float()
        )

    def _trained(self) -> list[tuple[str, torch.nn.Module]]:
        return [("unet", self.unet)] + ([("text_encoder", self.text_encoder)] if self.options.train_text_encoder else [])

    def is_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for _, module in self._trained() for p in module.parameters())

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {
            f"{name}.{key}": value.detach().to("cpu", torch.float32 if value.is_floating_point() else None).clone()
            for name, module in self._trained() for key, value in module.state_dict().items()
        }  # fmt: skip

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, module in self._trained():
            prefix = f"{name}."
            module.load_state_dict({key.removeprefix(prefix): value for key, value in tensors.items()
                                    if key.startswith(prefix)})  # fmt: skip

    def run_identity(self) -> dict:
        """The options and the class images' content: another class set is another run."""
        return {"dreambooth": asdict(self.options), "class_images": [file_sha256(path) for path in self.class_images]}

    def checkpoint_files(self, out_dir: Path, step: int) -> dict[str, Path]:
        """Checkpoints are the single file only: a diffusers folder per checkpoint would double the disk use."""
        return {f"checkpoint_{step}_single_file": Path(out_dir) / CHECKPOINTS_DIR / f"{self.settings.name}-{step}.safetensors"}

    def _save_single_file(self, path: Path, step: int) -> Path:
        metadata = {"step": str(step), "base_model": self.base.short_hash, "method": "dreambooth"}
        return save_single_file(self.unet, self.base.vae, self.text_encoder, path, metadata=metadata)

    def save_checkpoint(self, out_dir: Path, step: int, optimizer: torch.optim.Optimizer) -> dict[str, Path]:
        files = self.checkpoint_files(out_dir, step)
        for path in files.values():
            self._save_single_file(path, step)
        return files

    def save_final(self, out_dir: Path, step: int, optimizer: torch.optim.Optimizer) -> dict[str, Path]:
        """`<name>/` (diffusers) and `<name>.safetensors` (original layout); the folder beside the file with the
        same stem is also the file's config sidecar for our single-file loader."""
        out_dir = Path(out_dir)
        folder = save_diffusers_folder(self.base, self.unet, self.text_encoder, out_dir / self.settings.name)
        single = self._save_single_file(out_dir / f"{self.settings.name}.safetensors", step)
        return {"diffusers": folder, "single_file": single}


def _contains(sequence: list[int], part: list[int]) -> bool:
    return any(sequence[start : start + len(part)] == part for start in range(len(sequence) - len(part) + 1))


@dataclass
class DreamBoothResult(LoopResult):
    unet: torch.nn.Module | None = None  # the trained copy
    text_encoder: torch.nn.Module | None = None  # the trained copy, or the base model's when it was not trained
    finite: bool = True  # no NaN/inf in the trained weights


def train_dreambooth(
    base: BaseModel,
    examples: Sequence[TrainingExample],
    settings: LoopSettings,
    options: DreamBoothOptions,
    out_dir: Path,
    *,
    class_images: Sequence[Path] = (),
    progress: Callable[[int, float], None] | None = None,
    latent_cache: Path | None = None,
    log: Callable[[str], None] | None = None,
    validation_examples: Sequence[TrainingExample] = (),
) -> DreamBoothResult:
    """Fine-tune through the shared loop, writing `<name>/` (diffusers), `<name>.safetensors` (original layout),
    `checkpoints/<name>-<step>.safetensors`, loss.csv and loss.png; the final files are written while the
    trained UNet is in place."""
    out_dir = Path(out_dir)
    method = DreamBoothMethod(base, settings, options, class_images, latent_cache)
    if log is not None:
        log(f"dreambooth {settings.name!r}: {'UNet and text encoder' if options.train_text_encoder else 'UNet'}, "
            f"{len(method.class_images)} class images of {options.class_prompt!r}"
            if method.class_images else f"dreambooth {settings.name!r}: no prior preservation")  # fmt: skip
    loop = run_training(
        base, examples, settings, method, out_dir, progress=progress, latent_cache=latent_cache, log=log,
        validation_examples=validation_examples,
        save_final=lambda step, optimizer: method.save_final(out_dir, step, optimizer),
    )  # fmt: skip
    loop.images_encoded += method.class_encoded
    return DreamBoothResult(**vars(loop), unet=method.unet, text_encoder=method.text_encoder, finite=method.is_finite())
