"""Textual-inversion training: learn a few token vectors so the frozen model reproduces the training images.

The algorithm is the webui's: VAE latents sampled once per image, a random timestep and noise per sample,
the frozen UNet predicts the noise (or velocity) from the prompt conditioning, and the MSE gradient reaches
only the embedding's vectors through the frozen UNet and text encoder. All randomness comes from one
seeded torch.Generator, so a seed gives the same vectors on CPU.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from PIL import Image

from common.atomic import write_text
from common.hashing import bytes_sha256, file_sha256, json_sha256
from training.acceleration import (
    ATTENTION_KINDS,
    MIXED_PRECISION_MODES,
    accelerated_unet,
    autocast,
    autocast_dtype,
    needs_loss_scaling,
)
from training.base_model import BaseModel
from training.diffusion_objective import noise_scheduler, prediction_target
from training.embedding_formats import (
    EmbeddingFile,
    load_webui_optim,
    read_embedding,
    save_diffusers_embedding,
    save_kohya_embedding,
    save_webui_optim,
    save_webui_pt,
    webui_embedding_dict,
)
from training.latent_cache import LATENT_SAMPLING_METHODS, latent_distributions, sample_latents
from training.loss_checks import should_stop_early
from training.lr_schedule import parse_schedule
from training.optimizers import OPTIMIZERS, WEBUI_OPTIMIZER_NAMES, make_optimizer
from training.plots import plot_loss
from training.previews import PreviewRenderer, PreviewSettings, preview_files
from training.png_embedding import save_png_embedding
from training.prompt_encoding import (
    NO_SLOT,
    PlaceholderPrompts,
    check_clip_skip,
    encode_prompts,
    fit_vectors,
    initial_vectors,
    tokenize_with_placeholder,
)
from training.templates import NAME_KEYWORD, load_template, render_prompt
from training.training_state import STATE_FILE, TrainingState, load_state, save_state
from training.validation import ValidationSet, build_validation_set, validation_loss

# Prompt syntax the webui gives meaning to (emphasis, weights, tag separators) cannot be part of a name.
_NAME_PATTERN = re.compile(r"[^\s,()\[\]{}:]+")
CLIP_GRAD_MODES = ("disabled", "value", "norm")
# How often the resumable state is saved when no checkpoint cadence is set: a crash loses at most this many steps.
DEFAULT_STATE_EVERY = 50
VALIDATION_CSV = "validation.csv"


class TrainingDivergedError(RuntimeError):
    """The loss or the vectors became NaN/inf; nothing from that step on is written."""


@dataclass(frozen=True)
class TextualInversionSettings:
    name: str  # the embedding name, used as [name] in prompts
    vectors_per_token: int = 1
    initialization_text: str = "*"  # tokenised; its vectors repeated/truncated to fit vectors_per_token
    learning_rate: str = "0.005"  # webui schedule syntax
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_steps: int = 1000  # optimizer steps (the webui's step)
    template: str = "subject_filewords"
    seed: int = 0
    clip_skip: int = 1
    save_every: int = 0  # write a checkpoint embedding every N steps (0 = only the final one)
    shuffle_tags: bool = False
    tag_dropout: float = 0.0
    keep_tokens: int = 0  # kohya's name: the first N tags stay first and are never dropped (e.g. a trigger word)
    clip_grad_mode: str = "disabled"  # webui: disabled | value | norm
    clip_grad_value: str = "0.1"  # a number or a schedule in the learning-rate syntax
    latent_sampling_method: str = "once"  # webui: once | deterministic | random
    save_image_with_stored_embedding: bool = True  # webui: also write <name>.png (and previews) carrying the embedding
    resume: bool = True  # continue from a saved state of the same run (same settings, images, base model)
    initialization_embedding: str = ""  # an embedding file whose vectors (repeated/truncated) replace initialization_text
    overwrite_old_embedding: bool = True  # False: start from the existing final <name>.pt in out_dir
    optimizer: str = "adamw"  # adamw | adamw8bit (bitsandbytes)
    weight_decay: float = 0.0  # AdamW's decoupled weight decay, on the learned vectors only
    gradient_checkpointing: bool = False
    attention: str = "sdpa"  # sdpa | classic
    compile: bool = False  # torch.compile the UNet
    mixed_precision: str = "no"  # no | fp16 (CUDA) | bf16
    previews: PreviewSettings = field(default_factory=PreviewSettings)
    early_stopping_patience: int = 0  # stop after this many evaluations without a better loss (0: off)

    def __post_init__(self) -> None:
        if not _NAME_PATTERN.fullmatch(self.name):
            raise ValueError(f"embedding name {self.name!r}: use one word without spaces or any of , ( ) [ ] {{ }} :")
        limits = {
            "vectors_per_token": (self.vectors_per_token, 1, 75),
            "batch_size": (self.batch_size, 1, None),
            "gradient_accumulation_steps": (self.gradient_accumulation_steps, 1, None),
            "max_steps": (self.max_steps, 1, None),
            "clip_skip": (self.clip_skip, 1, None),
            "save_every": (self.save_every, 0, None),
            "keep_tokens": (self.keep_tokens, 0, None),
            "early_stopping_patience": (self.early_stopping_patience, 0, None),
        }
        for key, (value, low, high) in limits.items():
            if value < low or (high is not None and value > high):
                bound = f"between {low} and {high}" if high is not None else f"at least {low}"
                raise ValueError(f"{key} must be {bound}, got {value}")
        if not 0.0 <= self.tag_dropout < 1.0:
            raise ValueError(f"tag_dropout must be in [0, 1), got {self.tag_dropout}")
        if self.clip_grad_mode not in CLIP_GRAD_MODES:
            raise ValueError(f"clip_grad_mode must be one of {', '.join(CLIP_GRAD_MODES)}, got {self.clip_grad_mode!r}")
        if self.clip_grad_mode != "disabled":
            try:
                parse_schedule(self.clip_grad_value, self.max_steps)
            except ValueError as error:
                raise ValueError(f"clip_grad_value: {error}".replace("learning rate ", "")) from error
        if self.latent_sampling_method not in LATENT_SAMPLING_METHODS:
            raise ValueError(
                f"latent_sampling_method must be one of {', '.join(LATENT_SAMPLING_METHODS)}, "
                f"got {self.latent_sampling_method!r}"
            )
        parse_schedule(self.learning_rate, self.max_steps)
        choices = {"optimizer": (self.optimizer, OPTIMIZERS), "attention": (self.attention, ATTENTION_KINDS),
                   "mixed_precision": (self.mixed_precision, MIXED_PRECISION_MODES)}  # fmt: skip
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be at least 0, got {self.weight_decay}")
        if self.early_stopping_patience and not self.save_every:
            raise ValueError(
                "early_stopping_patience needs save_embedding_every (save_every) above 0: the loss is evaluated "
                "at each checkpoint, and without checkpoints there is only the final evaluation"
            )


@dataclass(frozen=True)
class TrainingExample:
    image_path: Path  # a prepared square image (already at the training resolution)
    filewords: str  # the caption; substituted for [filewords]


@dataclass(frozen=True)
class Evaluation:
    """One row of validation.csv, at a checkpoint or the final step."""

    step: int
    validation_loss: float  # NaN when there is no validation split
    training_loss: float  # mean training loss over the steps since the previous evaluation


@dataclass
class TrainingResult:
    vectors: torch.Tensor  # (n_vectors, hidden) float32 on CPU
    steps: int
    losses: list[float]  # one per optimizer step (mean over its micro-batches)
    files: dict[str, Path] = field(default_factory=dict)  # "webui_pt", "diffusers", "loss_csv", "loss_png", checkpoints
    resumed_from: int = 0  # the step a saved state was resumed at (0: a fresh run)
    images_encoded: int = 0  # images the VAE encoded (latent cache misses)
    continued_from: int = 0  # the step of the existing embedding this run continued (overwrite_old_embedding off)
    validations: list[Evaluation] = field(default_factory=list)  # one per checkpoint and the final step
    stopped_early_at: int | None = None  # the step early stopping ended the run at (None: it ran to the end)


def caption_for_step(filewords: str, settings: TextualInversionSettings, generator: torch.Generator) -> str:
    """Tag dropout and shuffling, the webui's caption augmentation, with our generator instead of `random`.

    The first keep_tokens tags are left alone, as kohya does, so a trigger word or the character's name
    stays at the front of every caption.
    """
    if not settings.shuffle_tags and settings.tag_dropout == 0:
        return filewords
    tags = [tag.strip() for tag in filewords.split(",") if tag.strip()]
    fixed, tags = tags[: settings.keep_tokens], tags[settings.keep_tokens :]
    if settings.tag_dropout > 0:
        keep = torch.rand(len(tags), generator=generator) >= settings.tag_dropout
        tags = [tag for tag, kept in zip(tags, keep.tolist()) if kept]
    if settings.shuffle_tags:
        tags = [tags[i] for i in torch.randperm(len(tags), generator=generator).tolist()]
    return ", ".join(fixed + tags)


def clip_gradients(vectors: torch.nn.Parameter, mode: str, limit: float) -> None:
    """The webui's gradient clipping: each component to [-limit, limit] ("value") or the whole norm ("norm")."""
    if mode == "value":
        torch.nn.utils.clip_grad_value_([vectors], limit)
    elif mode == "norm":
        torch.nn.utils.clip_grad_norm_([vectors], limit)


class EpochSampler:
    """Epochs of shuffled indices cut into full batches; an epoch's remainder is dropped, as the webui does.

    An object rather than a generator function so its position can be saved and restored with a checkpoint.
    """

    def __init__(self, n_examples: int, batch_size: int, generator: torch.Generator) -> None:
        self.n_examples, self.batch_size, self.generator = n_examples, batch_size, generator
        self.order: list[int] = []
        self.position = 0

    def __iter__(self) -> EpochSampler:
        return self

    def __next__(self) -> list[int]:
        if self.position + self.batch_size > len(self.order):
            self.order = torch.randperm(self.n_examples, generator=self.generator).tolist()
            self.position = 0
        batch = self.order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return batch

    def state_dict(self) -> dict[str, object]:
        return {"order": list(self.order), "position": self.position}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.order, self.position = list(state["order"]), int(state["position"])


def training_template(settings: TextualInversionSettings) -> list[str]:
    lines = load_template(settings.template)
    if not any(NAME_KEYWORD in line for line in lines):
        raise ValueError(
            f"prompt template {settings.template!r} has no {NAME_KEYWORD} line, so nothing would train the embedding"
        )
    return lines


def check_prompts_fit(
    base: BaseModel, examples: Sequence[TrainingExample], lines: list[str], settings: TextualInversionSettings
) -> None:
    """Fail before training, naming the image, if some prompt would lose the embedding to truncation or tokenization."""
    name_lines = [line for line in lines if NAME_KEYWORD in line]
    for example in examples:
        prompts = [render_prompt(line, settings.name, example.filewords) for line in name_lines]
        try:
            tokens = tokenize_with_placeholder(base.tokenizer, prompts, settings.name, settings.vectors_per_token)
        except ValueError as error:
            raise ValueError(f"{example.image_path}: {error}") from error
        missing = [prompt for prompt, row in zip(prompts, tokens.slots) if not (row != NO_SLOT).any()]
        if missing:
            raise ValueError(
                f"{example.image_path}: the name {settings.name!r} tokenizes differently inside the prompt "
                f"{missing[0]!r}, so the embedding would never be used; choose a name ending in a letter or digit"
            )


@dataclass
class _Trainer:
    """The state one training run threads through its steps."""

    base: BaseModel
    settings: TextualInversionSettings
    lines: list[str]
    examples: Sequence[TrainingExample]
    latent_mean: torch.Tensor  # (N, C, h, w) float32 on CPU, from the latent cache
    latent_std: torch.Tensor
    latents: torch.Tensor | None  # fixed latents for "once" and "deterministic"; None for "random"
    scheduler: DDPMScheduler
    unet: torch.nn.Module  # the base UNet, or its torch.compile wrapper
    compute_dtype: torch.dtype | None  # the autocast dtype; None: full precision
    vectors: torch.nn.Parameter
    generator: torch.Generator
    batches: EpochSampler
    encoded: int  # images the VAE encoded in this run (cache misses)
    last_prompt: str = ""  # the first prompt of the latest micro-batch: the preview prompt by default

    def latents_for(self, indices: list[int]) -> torch.Tensor:
        """The batch's latents on the device; "random" draws a fresh sample from each image's distribution."""
        if self.latents is not None:
            latents = self.latents[indices]
        else:
            latents = sample_latents(self.latent_mean[indices], self.latent_std[indices], self.generator)
        return latents.to(device=self.base.device, dtype=self.base.dtype)

    def prompts_for(self, indices: list[int]) -> PlaceholderPrompts:
        prompts = []
        for index in indices:
            line = self.lines[int(torch.randint(len(self.lines), (1,), generator=self.generator))]
            caption = caption_for_step(self.examples[index].filewords, self.settings, self.generator)
            prompts.append(render_prompt(line, self.settings.name, caption))
        self.last_prompt = prompts[0]
        return tokenize_with_placeholder(self.base.tokenizer, prompts, self.settings.name, self.settings.vectors_per_token)

    def micro_batch_loss(self, indices: list[int]) -> torch.Tensor:
        latents = self.latents_for(indices)
        noise = torch.randn(latents.shape, generator=self.generator).to(device=latents.device, dtype=latents.dtype)
        timesteps = torch.randint(self.scheduler.config.num_train_timesteps, (len(indices),), generator=self.generator)
        timesteps = timesteps.to(latents.device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        target = prediction_target(self.scheduler, latents, noise, timesteps)
        prompts = self.prompts_for(indices)
        with autocast(self.base.device, self.compute_dtype):
            conditioning = encode_prompts(self.base.text_encoder, prompts, self.vectors, self.settings.clip_skip)
            prediction = self.unet(noisy, timesteps, encoder_hidden_states=conditioning).sample
        return F.mse_loss(prediction.float(), target.float())


def _diverged(step: int, what: str, rate: float) -> TrainingDivergedError:
    return TrainingDivergedError(
        f"textual inversion diverged at step {step}: {what}. Nothing from this step on was saved. "
        f"Try a lower learning rate (this step used {rate:g}), check the training images, "
        "or train in float32 if the model runs in half precision."
    )


def _freeze(base: BaseModel) -> None:
    """Restate load_base_model's contract on the shared model: eval mode, no parameter collects gradients.

    Needed because other users of the same BaseModel may have swapped modules (diffusers'
    load/unload_textual_inversion replaces the token table with a fresh trainable one).
    """
    for module in (base.text_encoder, base.vae, base.unet):
        module.requires_grad_(False)
        module.eval()


def _save_embedding_pair(
    base: BaseModel,
    settings: TextualInversionSettings,
    vectors: torch.Tensor,
    step: int,
    pt_path: Path,
    safetensors_path: Path,
    optimizer: torch.optim.Optimizer,
) -> None:
    """The webui `.pt` with its `.optim` companion (so the webui can continue training it) and the diffusers file."""
    save_webui_pt(pt_path, settings.name, vectors, step, base.short_hash, base.name)
    save_webui_optim(pt_path, vectors, optimizer.state_dict(), WEBUI_OPTIMIZER_NAMES[settings.optimizer])
    save_diffusers_embedding(safetensors_path, settings.name, vectors, step=step)


def _checkpoint_files(out_dir: Path, name: str, step: int) -> dict[str, Path]:
    stem = out_dir / "checkpoints" / f"{name}-{step}"
    return {f"checkpoint_{step}_webui_pt": stem.with_suffix(".pt"), f"checkpoint_{step}_diffusers": stem.with_suffix(".safetensors")}


def _save_png_card(trainer: _Trainer, vectors: torch.Tensor, step: int, path: Path) -> Path:
    """The webui's PNG-embedded form around the first training image (previews are not rendered here)."""
    with Image.open(trainer.examples[0].image_path) as picture:
        card = picture.convert("RGB")
    data = webui_embedding_dict(trainer.settings.name, vectors, step, trainer.base.short_hash, trainer.base.name)
    return save_png_embedding(path, card, data)


def write_loss_csv(path: Path, losses: list[float], rates: list[float], first_step: int = 1) -> Path:
    pairs = enumerate(zip(losses, rates), start=first_step)
    rows = [f"{step},{float(loss)!r},{float(rate)!r}" for step, (loss, rate) in pairs]
    return write_text(path, "\n".join(["step,loss,learning_rate", *rows]) + "\n")


def clip_limits(settings: TextualInversionSettings) -> Callable[[int], float | None]:
    """step -> clipping limit (None when disabled); a schedule that ends early keeps its last value, as in the webui."""
    if settings.clip_grad_mode == "disabled":
        return lambda step: None
    schedule = parse_schedule(settings.clip_grad_value, settings.max_steps)
    return lambda step: schedule.rate_at(min(step, schedule.end_step))


def run_key(
    base: BaseModel, examples: Sequence[TrainingExample], settings: TextualInversionSettings, start: torch.Tensor
) -> str:
    """What makes two runs the same run: a saved state resumes only under the same key.

    Checkpoint cadence, previews, early stopping and the resume switch do not change the trained vectors (up
    to the step a run ends at), so they are left out; neither are the validation images; the starting vectors are in, so a changed initialization file or continued embedding is a new run.
    """
    outputs_only = ("save_every", "resume", "save_image_with_stored_embedding", "previews", "early_stopping_patience")
    defining = {key: value for key, value in vars(settings).items() if key not in outputs_only}
    images = [[str(example.image_path), file_sha256(example.image_path), example.filewords] for example in examples]
    return json_sha256({
        "settings": defining, "images": images, "base_model": base.fingerprint,
        "start": bytes_sha256(start.to(torch.float32).numpy().tobytes()),
    })  # fmt: skip


def _fitted_vectors(path: Path, embedding: EmbeddingFile, settings: TextualInversionSettings, hidden: int) -> torch.Tensor:
    vectors = embedding.vectors
    if vectors.shape[1] != hidden:
        raise ValueError(
            f"{path}: vectors of size {vectors.shape[1]} do not fit this model's text encoder ({hidden}); "
            "was it trained for another base model family (SD 2.x, SDXL)?"
        )
    return fit_vectors(vectors, settings.vectors_per_token)


@dataclass(frozen=True)
class _StartingPoint:
    vectors: torch.Tensor
    origin: str  # where the vectors came from, for the log
    continued: Path | None = None  # the dataset's own embedding when training continues it
    step: int = 0  # the step that embedding reached: the webui counts on from it towards max_steps


def _starting_point(base: BaseModel, settings: TextualInversionSettings, out_dir: Path) -> _StartingPoint:
    """In the webui's order: the existing embedding when it is not to be overwritten, else an initialization
    embedding file (webui .pt, diffusers, kohya or PNG), else the initialization text's token vectors."""
    hidden = base.text_encoder.get_input_embeddings().embedding_dim
    existing = Path(out_dir) / f"{settings.name}.pt"
    if not settings.overwrite_old_embedding and existing.is_file():
        embedding = read_embedding(existing)
        step = embedding.step or 0
        vectors = _fitted_vectors(existing, embedding, settings, hidden)
        return _StartingPoint(vectors, f"continued from {existing} at step {step}", existing, step)
    if settings.initialization_embedding:
        path = Path(settings.initialization_embedding)
        return _StartingPoint(_fitted_vectors(path, read_embedding(path), settings, hidden), f"initialized from {path}")
    text = settings.initialization_text
    vectors = initial_vectors(base.tokenizer, base.text_encoder, text, settings.vectors_per_token)
    return _StartingPoint(vectors, f"initialized from the text {text!r}")


def starting_vectors(base: BaseModel, settings: TextualInversionSettings, out_dir: Path) -> tuple[torch.Tensor, str]:
    """The vectors training starts from, and where they came from (for the log)."""
    point = _starting_point(base, settings, out_dir)
    return point.vectors, point.origin


def _start(
    base: BaseModel,
    examples: Sequence[TrainingExample],
    settings: TextualInversionSettings,
    latent_cache: Path | None,
    start: torch.Tensor,
    unet: torch.nn.Module,
) -> _Trainer:
    if not examples:
        raise ValueError("textual inversion needs at least one training example")
    if settings.batch_size > len(examples):
        raise ValueError(f"batch_size {settings.batch_size} is larger than the {len(examples)} training examples")
    check_clip_skip(base.text_encoder, settings.clip_skip)
    compute_dtype = autocast_dtype(settings.mixed_precision, base.device, base.dtype)
    scheduler = noise_scheduler(base)
    lines = training_template(settings)
    check_prompts_fit(base, examples, lines, settings)
    _freeze(base)
    mean, std, encoded = latent_distributions(
        base.vae, [Path(example.image_path) for example in examples], base.vae_scale_factor, latent_cache
    )
    generator = torch.Generator(device="cpu").manual_seed(settings.seed)
    fixed = {"once": lambda: sample_latents(mean, std, generator), "deterministic": lambda: mean, "random": lambda: None}
    return _Trainer(
        base=base,
        settings=settings,
        lines=lines,
        examples=examples,
        latent_mean=mean,
        latent_std=std,
        latents=fixed[settings.latent_sampling_method](),
        scheduler=scheduler,
        unet=unet,
        compute_dtype=compute_dtype,
        vectors=torch.nn.Parameter(start.to(base.device)),
        generator=generator,
        batches=EpochSampler(len(examples), settings.batch_size, generator),
        encoded=encoded,
    )


def _optimizer_step(
    trainer: _Trainer,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    step: int,
    rate: float,
    clip_limit: float | None = None,
) -> float:
    """One webui step: accumulate gradients over the micro-batches, (clip,) then update; returns their mean loss.

    The scaler keeps half-precision gradients from underflowing; when disabled it is a pass-through.
    """
    for group in optimizer.param_groups:
        group["lr"] = rate
    optimizer.zero_grad(set_to_none=True)
    micro_batches = trainer.settings.gradient_accumulation_steps
    total = 0.0
    for _ in range(micro_batches):
        loss = trainer.micro_batch_loss(next(trainer.batches))
        if not torch.isfinite(loss):
            raise _diverged(step, f"the loss is {loss.item()}", rate)
        scaler.scale(loss / micro_batches).backward()
        total += loss.item()
    if clip_limit is not None:
        scaler.unscale_(optimizer)  # clip the true gradient, not the loss-scaled one
        clip_gradients(trainer.vectors, trainer.settings.clip_grad_mode, clip_limit)
    scaler.step(optimizer)
    scaler.update()
    if not torch.isfinite(trainer.vectors).all():
        raise _diverged(step, "the embedding vectors became NaN/inf", rate)
    return total / micro_batches


@dataclass
class _Progress:
    """What a run has done so far; restored from a saved state on resume."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)
    resumed_from: int = 0
    evaluations: list[Evaluation] = field(default_factory=list)


def _capture(
    trainer: _Trainer, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, progress: _Progress, key: str,
    validation_key: str,
) -> TrainingState:
    return TrainingState(
        run_key=key,
        step=progress.step,
        vectors=trainer.vectors.detach().to("cpu", torch.float32),
        optimizer=optimizer.state_dict(),
        scaler=scaler.state_dict(),
        generator=trainer.generator.get_state(),
        sampler=trainer.batches.state_dict(),
        losses=progress.losses,
        rates=progress.rates,
        evaluations=[[row.step, row.validation_loss, row.training_loss] for row in progress.evaluations],
        validation_key=validation_key,
    )


def _restore(
    trainer: _Trainer, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, state: TrainingState,
    validation_key: str, log: Callable[[str], None] | None = None,
) -> _Progress:
    with torch.no_grad():
        trainer.vectors.copy_(state.vectors.to(trainer.vectors.device))
    optimizer.load_state_dict(state.optimizer)
    if state.scaler:
        scaler.load_state_dict(state.scaler)
    trainer.generator.set_state(state.generator)
    trainer.batches.load_state_dict(state.sampler)
    evaluations = [Evaluation(int(step), float(validation), float(training))
                   for step, validation, training in state.evaluations]
    if evaluations and state.validation_key != validation_key:
        evaluations = []  # measured on other validation images (or none): not comparable with the coming ones
        if log is not None:
            log("the validation images changed since the saved state: its earlier evaluation rows are dropped")
    return _Progress(step=state.step, losses=list(state.losses), rates=list(state.rates), resumed_from=state.step,
                     evaluations=evaluations)


@dataclass
class _Evaluator:
    """The loss at each checkpoint and the final step: validation loss on the fixed held-out samples (when
    there are validation images) beside the mean training loss since the previous evaluation."""

    trainer: _Trainer
    validation: ValidationSet | None
    csv_path: Path

    @property
    def key(self) -> str:
        return self.validation.key if self.validation is not None else ""

    def evaluate(self, done: _Progress) -> Evaluation:
        first = done.step - len(done.losses)  # the step before the first loss in the log
        previous = max(done.evaluations[-1].step, first) if done.evaluations else first
        recent = done.losses[previous - first :]
        row = Evaluation(done.step, self._validation_loss(), float(sum(recent) / len(recent)))
        done.evaluations.append(row)
        if self.validation is not None:
            write_validation_csv(self.csv_path, done.evaluations)
        return row

    def judged(self, rows: Sequence[Evaluation]) -> list[float]:
        """The losses early stopping looks at: validation when there is a split, else the training rounds."""
        return [row.validation_loss if self.validation is not None else row.training_loss for row in rows]

    def _validation_loss(self) -> float:
        if self.validation is None:
            return math.nan
        trainer, settings = self.trainer, self.trainer.settings

        def encode(prompts: list[str]) -> torch.Tensor:
            tokens = tokenize_with_placeholder(trainer.base.tokenizer, prompts, settings.name, settings.vectors_per_token)
            return encode_prompts(trainer.base.text_encoder, tokens, trainer.vectors, settings.clip_skip)

        return validation_loss(
            self.validation, trainer.unet, encode, trainer.scheduler, device=trainer.base.device,
            dtype=trainer.base.dtype, batch_size=settings.batch_size, compute_dtype=trainer.compute_dtype,
            eval_modules=(trainer.base.text_encoder,),
        )  # fmt: skip


def _validation_set(
    trainer: _Trainer, examples: Sequence[TrainingExample], latent_cache: Path | None
) -> ValidationSet | None:
    if not examples:
        return None
    check_prompts_fit(trainer.base, examples, trainer.lines, trainer.settings)
    return build_validation_set(
        trainer.base.vae, trainer.base.vae_scale_factor, examples, trainer.lines, trainer.settings.name,
        trainer.scheduler.config.num_train_timesteps, latent_cache,
    )  # fmt: skip


def write_validation_csv(path: Path, rows: Sequence[Evaluation]) -> Path:
    lines = [f"{row.step},{float(row.validation_loss)!r},{float(row.training_loss)!r}" for row in rows]
    return write_text(path, "\n".join(["step,validation_loss,training_loss", *lines]) + "\n")


def _continue_optimizer(
    optimizer: torch.optim.Optimizer, pt_path: Path, start: torch.Tensor, settings: TextualInversionSettings,
    log: Callable[[str], None] | None,
) -> None:
    """Carry AdamW's moments over from the `.pt.optim` beside a continued embedding, as the webui does."""
    state = load_webui_optim(pt_path, start, WEBUI_OPTIMIZER_NAMES[settings.optimizer])
    if state is not None:
        optimizer.load_state_dict(state)
    if log is not None:
        log(f"optimizer state {'loaded from' if state is not None else 'fresh: no matching'} {pt_path}.optim")


def _save_checkpoint(
    trainer: _Trainer, optimizer: torch.optim.Optimizer, step: int, out_dir: Path, files: dict[str, Path]
) -> None:
    paths = _checkpoint_files(out_dir, trainer.settings.name, step)
    pt_path, safetensors_path = paths.values()
    _save_embedding_pair(trainer.base, trainer.settings, trainer.vectors, step, pt_path, safetensors_path, optimizer)
    files.update(paths)


def _run_files(settings: TextualInversionSettings, out_dir: Path, resumed_from: int) -> dict[str, Path]:
    """The checkpoints and previews written before a resume: they are still this run's."""
    files: dict[str, Path] = {}
    for step in range(1, resumed_from + 1):
        if settings.save_every and step % settings.save_every == 0:
            files.update(_checkpoint_files(out_dir, settings.name, step))
        if settings.previews.every and step % settings.previews.every == 0:
            files.update(preview_files(out_dir, settings.name, step, settings.save_image_with_stored_embedding))
    return files


def train_textual_inversion(
    base: BaseModel,
    examples: Sequence[TrainingExample],
    settings: TextualInversionSettings,
    out_dir: Path,
    progress: Callable[[int, float], None] | None = None,
    latent_cache: Path | None = None,
    log: Callable[[str], None] | None = None,
    validation_examples: Sequence[TrainingExample] = (),
) -> TrainingResult:
    """Train, writing `<name>.pt`, `learned_embeds.safetensors`, `loss.csv`, `loss.png` (and checkpoints) atomically.

    Runs until the learning-rate schedule ends (max_steps, or earlier if the schedule says so, as in the webui),
    or until early stopping ends it at a checkpoint. The full state goes to `checkpoints/training_state.pt` with
    every checkpoint (every DEFAULT_STATE_EVERY steps when save_every is 0); a later call for the same run
    continues from it unless `resume` is off. Previews (every previews.every steps) go to `images/` and,
    carrying the embedding, `image_embeddings/`. At each checkpoint and the final step the run is evaluated;
    with `validation_examples` (held-out images, never trained on) that includes the validation loss, written
    to `validation.csv`. Evaluating changes neither the vectors nor the random stream.
    """
    out_dir = Path(out_dir)
    schedule = parse_schedule(settings.learning_rate, settings.max_steps)
    point = _starting_point(base, settings, out_dir)
    start, continued, first_step = point.vectors, point.continued, point.step
    if first_step >= schedule.end_step:
        raise ValueError(
            f"{continued}: already trained for {first_step} steps and max_steps is {settings.max_steps}; raise "
            "max_steps to train it further (as the webui counts), or set overwrite_old_embedding: true to start over"
        )
    if log is not None:
        log(f"embedding {settings.name!r} {point.origin}")
    with accelerated_unet(
        base.unet, attention=settings.attention, gradient_checkpointing=settings.gradient_checkpointing,
        compile_unet=settings.compile,
    ) as unet:  # fmt: skip
        trainer = _start(base, examples, settings, latent_cache, start, unet)
        evaluator = _Evaluator(trainer, _validation_set(trainer, validation_examples, latent_cache),
                               out_dir / VALIDATION_CSV)
        optimizer = make_optimizer(settings.optimizer, [trainer.vectors], schedule.rate_at(1), settings.weight_decay)
        scaler = torch.amp.GradScaler(base.device.type, enabled=needs_loss_scaling(base.device, trainer.compute_dtype))
        key = run_key(base, examples, settings, start)
        state_path = out_dir / "checkpoints" / STATE_FILE
        saved = load_state(state_path, key) if settings.resume else None
        if saved is not None:
            done = _restore(trainer, optimizer, scaler, saved, evaluator.key, log)
        else:
            done = _Progress(step=first_step)
            if continued is not None:
                _continue_optimizer(optimizer, continued, start, settings, log)
        if not done.evaluations:
            evaluator.csv_path.unlink(missing_ok=True)  # an earlier run's rows are not this run's
        state_every = settings.save_every or DEFAULT_STATE_EVERY
        clip_schedule = clip_limits(settings)
        previewer = None
        if settings.previews.every:
            previewer = PreviewRenderer(
                base, settings.previews, settings.name, settings.clip_skip, settings.save_image_with_stored_embedding
            )
        files = _run_files(settings, out_dir, done.resumed_from)
        stopped_early_at = None
        with torch.enable_grad():
            for step in range(done.step + 1, schedule.end_step + 1):
                rate = schedule.rate_at(step)
                loss = _optimizer_step(trainer, optimizer, scaler, step, rate, clip_schedule(step))
                done.step = step
                done.losses.append(loss)
                done.rates.append(rate)
                checkpoint = bool(settings.save_every) and step % settings.save_every == 0
                if checkpoint:
                    _save_checkpoint(trainer, optimizer, step, out_dir, files)
                if checkpoint or step == schedule.end_step:
                    evaluator.evaluate(done)
                if previewer is not None and step % settings.previews.every == 0:
                    files.update(previewer.save(trainer.vectors, trainer.last_prompt, step, out_dir))
                if checkpoint and step < schedule.end_step and _stops_early(evaluator, done, settings, log):
                    stopped_early_at = step
                elif step % state_every == 0 and step < schedule.end_step:
                    save_state(state_path, _capture(trainer, optimizer, scaler, done, key, evaluator.key))
                if progress is not None:
                    progress(step, loss)
                if stopped_early_at is not None:
                    break
    vectors = trainer.vectors.detach().to(device="cpu", dtype=torch.float32).clone()
    steps = done.step
    files["webui_pt"] = out_dir / f"{settings.name}.pt"
    files["diffusers"] = out_dir / "learned_embeds.safetensors"
    _save_embedding_pair(base, settings, vectors, steps, files["webui_pt"], files["diffusers"], optimizer)
    files["webui_optim"] = Path(f"{files['webui_pt']}.optim")
    files["kohya"] = save_kohya_embedding(out_dir / "kohya" / f"{settings.name}.safetensors", settings.name, vectors)
    if settings.save_image_with_stored_embedding:
        files["png_embedding"] = _save_png_card(trainer, vectors, steps, out_dir / f"{settings.name}.png")
    files["loss_csv"] = write_loss_csv(out_dir / "loss.csv", done.losses, done.rates, steps - len(done.losses) + 1)
    files["loss_png"] = plot_loss(files["loss_csv"], out_dir / "loss.png", f"textual inversion: {settings.name}")
    if evaluator.validation is not None:
        files["validation_csv"] = evaluator.csv_path
    state_path.unlink(missing_ok=True)  # finished: the final embedding is the result, nothing to resume
    return TrainingResult(
        vectors=vectors, steps=steps, losses=done.losses, files=files, resumed_from=done.resumed_from,
        images_encoded=trainer.encoded + (evaluator.validation.encoded if evaluator.validation else 0),
        continued_from=first_step, validations=list(done.evaluations), stopped_early_at=stopped_early_at,
    )  # fmt: skip


def _stops_early(
    evaluator: _Evaluator, done: _Progress, settings: TextualInversionSettings, log: Callable[[str], None] | None
) -> bool:
    losses = evaluator.judged(done.evaluations)
    if not should_stop_early(losses, settings.early_stopping_patience):
        return False
    best = done.evaluations[int(np.argmin(losses))]
    what = "validation" if evaluator.validation is not None else "training (no validation split; mean per round)"
    if log is not None:
        log(
            f"stopping early at step {done.step}: the {what} loss has not improved for "
            f"{settings.early_stopping_patience} evaluations (early_stopping_patience); the best was "
            f"{min(losses):.5f} at step {best.step}, whose checkpoint is kept"
        )
    return True
