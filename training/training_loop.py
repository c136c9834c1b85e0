"""The training loop every personalisation method shares: textual inversion, DreamArtist, hypernetworks, LoRA,
DreamBooth.

What the methods have in common is most of the work, and it is the part that must behave the same for all of
them: VAE latents from the shared latent cache, the webui's templates and caption augmentation, one seeded
CPU generator for every random draw (so a seed gives the same weights), gradient accumulation and clipping,
the webui's learning-rate schedule, the NaN guard, checkpoints with the full resumable state, validation loss
on the held-out split with early stopping, previews and the loss log and curve. What differs is small and
lives in a `TrainingMethod`: which parameters train, how a prompt becomes conditioning, how the UNet is
changed while training, and which files a checkpoint is.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from common.atomic import write_text
from common.hashing import file_sha256, json_sha256
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
from training.latent_cache import LATENT_SAMPLING_METHODS, latent_distributions, sample_latents
from training.loss_checks import should_stop_early
from training.lr_schedule import parse_schedule
from training.optimizers import OPTIMIZERS, make_optimizer
from training.plots import plot_loss
from training.previews import PreviewRenderer, PreviewSettings, preview_files
from training.prompt_encoding import check_clip_skip
from training.templates import NAME_KEYWORD, load_template, render_prompt
from training.training_state import STATE_FILE, TrainingState, load_state, save_state
from training.validation import ValidationSet, build_validation_set, validation_loss

CLIP_GRAD_MODES = ("disabled", "value", "norm")
# How often the resumable state is saved when no checkpoint cadence is set: a crash loses at most this many steps.
DEFAULT_STATE_EVERY = 50
VALIDATION_CSV = "validation.csv"
# Settings that change what a run writes or when it stops, never the weights up to the step it ends at.
OUTPUT_ONLY_SETTINGS = ("save_every", "resume", "save_image_with_stored_embedding", "previews",
                        "early_stopping_patience")  # fmt: skip


class TrainingDivergedError(RuntimeError):
    """The loss or the trained weights became NaN/inf; nothing from that step on is written."""


@dataclass(frozen=True)
class LoopSettings:
    """The dataset.yaml `training:` settings every method trains with."""

    name: str  # [name] in prompts
    learning_rate: str = "0.005"  # webui schedule syntax
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_steps: int = 1000  # optimizer steps (the webui's step)
    template: str = "subject_filewords"
    seed: int = 0
    clip_skip: int = 1
    save_every: int = 0  # write a checkpoint every N steps (0 = only the final files)
    shuffle_tags: bool = False
    tag_dropout: float = 0.0
    keep_tokens: int = 0  # kohya's name: the first N tags stay first and are never dropped (e.g. a trigger word)
    clip_grad_mode: str = "disabled"  # webui: disabled | value | norm
    clip_grad_value: str = "0.1"  # a number or a schedule in the learning-rate syntax
    latent_sampling_method: str = "once"  # webui: once | deterministic | random
    resume: bool = True  # continue from a saved state of the same run (same settings, images, base model)
    optimizer: str = "adamw"  # adamw | adamw8bit (bitsandbytes)
    weight_decay: float = 0.0  # AdamW's decoupled weight decay, on the trained parameters only
    gradient_checkpointing: bool = False
    attention: str = "sdpa"  # sdpa | classic
    compile: bool = False  # torch.compile the UNet
    mixed_precision: str = "no"  # no | fp16 (CUDA) | bf16
    previews: PreviewSettings = field(default_factory=PreviewSettings)
    early_stopping_patience: int = 0  # stop after this many evaluations without a better loss (0: off)

    def __post_init__(self) -> None:
        limits = {
            "batch_size": (self.batch_size, 1, None),
            "gradient_accumulation_steps": (self.gradient_accumulation_steps, 1, None),
            "max_steps": (self.max_steps, 1, None),
            "clip_skip": (self.clip_skip, 1, None),
            "save_every": (self.save_every, 0, None),
            "keep_tokens": (self.keep_tokens, 0, None),
            "early_stopping_patience": (self.early_stopping_patience, 0, None),
            **self.extra_limits(),
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

    def extra_limits(self) -> dict[str, tuple[int, int, int | None]]:
        """A method's own integer settings as key -> (value, low, high or None), checked with the common ones."""
        return {}


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
class Batch:
    """One micro-batch, on the device, with its prompts already rendered from the template."""

    step: int  # the optimizer step being computed (1-based)
    indices: list[int]
    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    noisy: torch.Tensor
    target: torch.Tensor
    prompts: list[str]
    generator: torch.Generator  # the run's only generator: a method draws any extra randomness from it
    compute_dtype: torch.dtype | None  # the autocast dtype; None: full precision


class TrainingMethod:
    """What one personalisation method adds to the shared loop. The defaults are a frozen model whose
    prompt encoding a subclass changes; a method overrides what it trains."""

    label = "training"  # for messages: "<label> diverged at step N"
    requires_name = True  # the template must put [name] in some prompt (what trains is tied to the name)

    def parameter_groups(self) -> list[dict[str, Any]]:
        """torch optimizer parameter groups; an optional "lr_scale" multiplies the scheduled rate for its group."""
        raise NotImplementedError

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """The (batch, tokens, hidden) conditioning, differentiable wherever the method trains."""
        raise NotImplementedError

    def loss(self, batch: Batch, unet: torch.nn.Module) -> torch.Tensor:
        with autocast(batch.latents.device, batch.compute_dtype):
            prediction = unet(batch.noisy, batch.timesteps, encoder_hidden_states=self.encode(batch.prompts)).sample
        return F.mse_loss(prediction.float(), batch.target.float())

    @contextlib.contextmanager
    def trained_unet(self, unet: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """The UNet the run trains through, for the whole run; the shared base UNet must come back unchanged."""
        yield unet

    @contextlib.contextmanager
    def attention_hooks(self, unet: torch.nn.Module) -> Iterator[None]:
        """Entered inside accelerated_unet (which installs fresh attention processors on entry)."""
        yield

    def train_modules(self) -> list[torch.nn.Module]:
        """Modules in training mode while training (dropout active) and inference mode for validation and previews."""
        return []

    def after_step(self, step: int) -> None:
        """Called after each optimizer step (e.g. an exponential moving average)."""

    def is_finite(self) -> bool:
        return all(bool(torch.isfinite(tensor).all()) for tensor in self.state_tensors().values())

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything trained, as CPU float32 copies, for the resumable state."""
        raise NotImplementedError

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def run_identity(self) -> dict[str, Any]:
        """What besides the settings, images and base model makes two runs the same (e.g. the starting weights)."""
        return {}

    def check_prompts(self, examples: Sequence[TrainingExample], lines: list[str]) -> None:
        """Fail before training, naming the image, when a prompt cannot train this method."""

    def checkpoint_files(self, out_dir: Path, step: int) -> dict[str, Path]:
        """The files save_checkpoint writes for `step` (names only: a resumed run lists earlier ones)."""
        return {}

    def save_checkpoint(self, out_dir: Path, step: int, optimizer: torch.optim.Optimizer) -> dict[str, Path]:
        return {}

    def preview_data(self, step: int) -> dict[str, Any] | None:
        """Data to store inside the preview PNG (the webui's embedding-in-image); None: plain previews."""
        return None


def caption_for_step(filewords: str, settings: LoopSettings, generator: torch.Generator) -> str:
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


def clip_gradients(parameters: Sequence[torch.nn.Parameter], mode: str, limit: float) -> None:
    """The webui's gradient clipping: each component to [-limit, limit] ("value") or the whole norm ("norm")."""
    if mode == "value":
        torch.nn.utils.clip_grad_value_(parameters, limit)
    elif mode == "norm":
        torch.nn.utils.clip_grad_norm_(parameters, limit)


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


def training_template(settings: LoopSettings, require_name: bool = True) -> list[str]:
    lines = load_template(settings.template)
    if require_name and not any(NAME_KEYWORD in line for line in lines):
        raise ValueError(
            f"prompt template {settings.template!r} has no {NAME_KEYWORD} line, so nothing would train {settings.name!r}"
        )
    return lines


def write_loss_csv(path: Path, losses: list[float], rates: list[float], first_step: int = 1) -> Path:
    pairs = enumerate(zip(losses, rates), start=first_step)
    rows = [f"{step},{float(loss)!r},{float(rate)!r}" for step, (loss, rate) in pairs]
    return write_text(path, "\n".join(["step,loss,learning_rate", *rows]) + "\n")


def write_validation_csv(path: Path, rows: Sequence[Evaluation]) -> Path:
    lines = [f"{row.step},{float(row.validation_loss)!r},{float(row.training_loss)!r}" for row in rows]
    return write_text(path, "\n".join(["step,validation_loss,training_loss", *lines]) + "\n")


def clip_limits(settings: LoopSettings) -> Callable[[int], float | None]:
    """step -> clipping limit (None when disabled); a schedule that ends early keeps its last value, as in the webui."""
    if settings.clip_grad_mode == "disabled":
        return lambda step: None
    schedule = parse_schedule(settings.clip_grad_value, settings.max_steps)
    return lambda step: schedule.rate_at(min(step, schedule.end_step))


def run_key(base: BaseModel, examples: Sequence[TrainingExample], settings: LoopSettings, method: TrainingMethod) -> str:
    """What makes two runs the same run: a saved state resumes only under the same key.

    Checkpoint cadence, previews, early stopping and the resume switch do not change the trained weights (up
    to the step a run ends at), so they are left out; neither are the validation images. The method adds what
    else defines it (the starting vectors, so a changed initialization file or continued embedding is a new run).
    """
    defining = {key: value for key, value in vars(settings).items() if key not in OUTPUT_ONLY_SETTINGS}
    images = [[str(example.image_path), file_sha256(example.image_path), example.filewords] for example in examples]
    return json_sha256({"settings": defining, "images": images, "base_model": base.fingerprint,
                        **method.run_identity()})  # fmt: skip


def freeze(base: BaseModel) -> None:
    """Restate load_base_model's contract on the shared model: eval mode, no parameter collects gradients.

    Needed because other users of the same BaseModel may have swapped modules (diffusers'
    load/unload_textual_inversion replaces the token table with a fresh trainable one, and leaves the config's
    vocab_size at the loaded size).
    """
    # diffusers' unload_textual_inversion shrinks the token table but not the config's vocab_size, and a saved
    # text encoder (DreamBooth's folder) must load back.
    base.text_encoder.config.vocab_size = base.text_encoder.get_input_embeddings().num_embeddings
    for module in (base.text_encoder, base.vae, base.unet):
        module.requires_grad_(False)
        module.eval()


@contextlib.contextmanager
def eval_mode(modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Eval mode for validation and previews, each module's own mode restored afterwards."""
    modes = [module.training for module in modules]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, mode in zip(modules, modes):
            module.train(mode)


@dataclass
class _Trainer:
    """The state one training run threads through its steps."""

    base: BaseModel
    settings: LoopSettings
    method: TrainingMethod
    lines: list[str]
    examples: Sequence[TrainingExample]
    latent_mean: torch.Tensor  # (N, C, h, w) float32 on CPU, from the latent cache
    latent_std: torch.Tensor
    latents: torch.Tensor | None  # fixed latents for "once" and "deterministic"; None for "random"
    scheduler: DDPMScheduler
    unet: torch.nn.Module  # the trained UNet, or its torch.compile wrapper
    compute_dtype: torch.dtype | None  # the autocast dtype; None: full precision
    generator: torch.Generator
    batches: EpochSampler
    encoded: int  # images the VAE encoded in this run (cache misses)
    parameters: list[torch.nn.Parameter] = field(default_factory=list)
    last_prompt: str = ""  # the first prompt of the latest micro-batch: the preview prompt by default

    def latents_for(self, indices: list[int]) -> torch.Tensor:
        """The batch's latents on the device; "random" draws a fresh sample from each image's distribution."""
        if self.latents is not None:
            latents = self.latents[indices]
        else:
            latents = sample_latents(self.latent_mean[indices], self.latent_std[indices], self.generator)
        return latents.to(device=self.base.device, dtype=self.base.dtype)

    def prompts_for(self, indices: list[int]) -> list[str]:
        prompts = []
        for index in indices:
            line = self.lines[int(torch.randint(len(self.lines), (1,), generator=self.generator))]
            caption = caption_for_step(self.examples[index].filewords, self.settings, self.generator)
            prompts.append(render_prompt(line, self.settings.name, caption))
        self.last_prompt = prompts[0]
        return prompts

    def batch(self, step: int, indices: list[int]) -> Batch:
        """The draws in a fixed order (latents, noise, timesteps, prompts), so a seed gives the same run."""
        latents = self.latents_for(indices)
        noise = torch.randn(latents.shape, generator=self.generator).to(device=latents.device, dtype=latents.dtype)
        timesteps = torch.randint(self.scheduler.config.num_train_timesteps, (len(indices),), generator=self.generator)
        timesteps = timesteps.to(latents.device)
        return Batch(
            step=step, indices=indices, latents=latents, noise=noise, timesteps=timesteps,
            noisy=self.scheduler.add_noise(latents, noise, timesteps),
            target=prediction_target(self.scheduler, latents, noise, timesteps),
            prompts=self.prompts_for(indices), generator=self.generator, compute_dtype=self.compute_dtype,
        )  # fmt: skip

    def micro_batch_loss(self, step: int, indices: list[int]) -> torch.Tensor:
        return self.method.loss(self.batch(step, indices), self.unet)


def _diverged(label: str, step: int, what: str, rate: float) -> TrainingDivergedError:
    return TrainingDivergedError(
        f"{label} diverged at step {step}: {what}. Nothing from this step on was saved. "
        f"Try a lower learning rate (this step used {rate:g}), check the training images, "
        "or train in float32 if the model runs in half precision."
    )


def _start(
    base: BaseModel,
    examples: Sequence[TrainingExample],
    settings: LoopSettings,
    method: TrainingMethod,
    latent_cache: Path | None,
    unet: torch.nn.Module,
) -> _Trainer:
    if not examples:
        raise ValueError(f"{method.label} needs at least one training example")
    if settings.batch_size > len(examples):
        raise ValueError(f"batch_size {settings.batch_size} is larger than the {len(examples)} training examples")
    check_clip_skip(base.text_encoder, settings.clip_skip)
    compute_dtype = autocast_dtype(settings.mixed_precision, base.device, base.dtype)
    scheduler = noise_scheduler(base)
    lines = training_template(settings, method.requires_name)
    method.check_prompts(examples, lines)
    mean, std, encoded = latent_distributions(
        base.vae, [Path(example.image_path) for example in examples], base.vae_scale_factor, latent_cache
    )
    generator = torch.Generator(device="cpu").manual_seed(settings.seed)
    fixed = {"once": lambda: sample_latents(mean, std, generator), "deterministic": lambda: mean, "random": lambda: None}
    return _Trainer(
        base=base, settings=settings, method=method, lines=lines, examples=examples, latent_mean=mean,
        latent_std=std, latents=fixed[settings.latent_sampling_method](), scheduler=scheduler, unet=unet,
        compute_dtype=compute_dtype, generator=generator,
        batches=EpochSampler(len(examples), settings.batch_size, generator), encoded=encoded,
    )  # fmt: skip


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
        group["lr"] = rate * group.get("lr_scale", 1.0)
    optimizer.zero_grad(set_to_none=True)
    micro_batches = trainer.settings.gradient_accumulation_steps
    label = trainer.method.label
    total = 0.0
    for _ in range(micro_batches):
        loss = trainer.micro_batch_loss(step, next(trainer.batches))
        if not torch.isfinite(loss):
            raise _diverged(label, step, f"the loss is {loss.item()}", rate)
        scaler.scale(loss / micro_batches).backward()
        total += loss.item()
    if clip_limit is not None:
        scaler.unscale_(optimizer)  # clip the true gradient, not the loss-scaled one
        clip_gradients(trainer.parameters, trainer.settings.clip_grad_mode, clip_limit)
    scaler.step(optimizer)
    scaler.update()
    trainer.method.after_step(step)
    if not trainer.method.is_finite():
        raise _diverged(label, step, "the trained weights became NaN/inf", rate)
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
        weights=trainer.method.state_tensors(),
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
    trainer.method.load_state_tensors(state.weights)
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
        trainer = self.trainer
        return validation_loss(
            self.validation, trainer.unet, trainer.method.encode, trainer.scheduler, device=trainer.base.device,
            dtype=trainer.base.dtype, batch_size=trainer.settings.batch_size, compute_dtype=trainer.compute_dtype,
            eval_modules=(trainer.base.text_encoder, *trainer.method.train_modules()),
        )  # fmt: skip


def _validation_set(
    trainer: _Trainer, examples: Sequence[TrainingExample], latent_cache: Path | None
) -> ValidationSet | None:
    if not examples:
        return None
    trainer.method.check_prompts(examples, trainer.lines)
    return build_validation_set(
        trainer.base.vae, trainer.base.vae_scale_factor, examples, trainer.lines, trainer.settings.name,
        trainer.scheduler.config.num_train_timesteps, latent_cache,
    )  # fmt: skip


def _run_files(settings: LoopSettings, method: TrainingMethod, out_dir: Path, resumed_from: int) -> dict[str, Path]:
    """The checkpoints and previews written before a resume: they are still this run's."""
    files: dict[str, Path] = {}
    with_data = method.preview_data(0) is not None
    for step in range(1, resumed_from + 1):
        if settings.save_every and step % settings.save_every == 0:
            files.update(method.checkpoint_files(out_dir, step))
        if settings.previews.every and step % settings.previews.every == 0:
            files.update(preview_files(out_dir, settings.name, step, with_data))
    return files


def _stops_early(
    evaluator: _Evaluator, done: _Progress, settings: LoopSettings, log: Callable[[str], None] | None
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


@dataclass
class LoopResult:
    steps: int  # the last step trained
    losses: list[float]  # one per optimizer step of this run (mean over its micro-batches)
    rates: list[float]
    files: dict[str, Path]  # checkpoints, previews, loss.csv, loss.png, validation.csv
    optimizer: torch.optim.Optimizer  # its final state, for files that carry it (the webui's .optim)
    resumed_from: int = 0  # the step a saved state was resumed at (0: a fresh run)
    images_encoded: int = 0  # images the VAE encoded (latent cache misses), training and validation
    validations: list[Evaluation] = field(default_factory=list)  # one per checkpoint and the final step
    stopped_early_at: int | None = None  # the step early stopping ended the run at (None: it ran to the end)


def run_training(
    base: BaseModel,
    examples: Sequence[TrainingExample],
    settings: LoopSettings,
    method: TrainingMethod,
    out_dir: Path,
    *,
    progress: Callable[[int, float], None] | None = None,
    latent_cache: Path | None = None,
    log: Callable[[str], None] | None = None,
    validation_examples: Sequence[TrainingExample] = (),
    first_step: int = 0,
    on_fresh_start: Callable[[torch.optim.Optimizer], None] | None = None,
    save_final: Callable[[int, torch.optim.Optimizer], dict[str, Path]] | None = None,
) -> LoopResult:
    """Train `method` from `first_step` until the learning-rate schedule ends (max_steps, or earlier if the
    schedule says so, as in the webui) or early stopping ends it at a checkpoint.

    The full state goes to `checkpoints/training_state.pt` with every checkpoint (every DEFAULT_STATE_EVERY
    steps when save_every is 0); a later call for the same run continues from it unless `resume` is off.
    Previews (every previews.every steps) go to `images/`. At each checkpoint and the final step the run is
    evaluated; with `validation_examples` (held-out images, never trained on) that includes the validation
    loss, written to `validation.csv`. Evaluating changes neither the weights nor the random stream.
    `on_fresh_start(optimizer)` runs when no saved state was resumed (e.g. to load a continued optimizer
    state); `save_final(step, optimizer)` writes the method's final files while the trained UNet is still
    in place. Then `loss.csv` and `loss.png` are written and the saved state is removed.
    """
    out_dir = Path(out_dir)
    schedule = parse_schedule(settings.learning_rate, settings.max_steps)
    freeze(base)
    final_files: dict[str, Path] = {}
    with method.trained_unet(base.unet) as raw_unet, accelerated_unet(
        raw_unet, attention=settings.attention, gradient_checkpointing=settings.gradient_checkpointing,
        compile_unet=settings.compile,
    ) as unet, method.attention_hooks(raw_unet):  # fmt: skip
        trainer = _start(base, examples, settings, method, latent_cache, unet)
        evaluator = _Evaluator(trainer, _validation_set(trainer, validation_examples, latent_cache),
                               out_dir / VALIDATION_CSV)
        groups = method.parameter_groups()
        trainer.parameters = [parameter for group in groups for parameter in group["params"]]
        optimizer = make_optimizer(settings.optimizer, groups, schedule.rate_at(1), settings.weight_decay)
        scaler = torch.amp.GradScaler(base.device.type, enabled=needs_loss_scaling(base.device, trainer.compute_dtype))
        key = run_key(base, examples, settings, method)
        state_path = out_dir / "checkpoints" / STATE_FILE
        saved = load_state(state_path, key) if settings.resume else None
        if saved is not None:
            done = _restore(trainer, optimizer, scaler, saved, evaluator.key, log)
        else:
            done = _Progress(step=first_step)
            if on_fresh_start is not None:
                on_fresh_start(optimizer)
        if not done.evaluations:
            evaluator.csv_path.unlink(missing_ok=True)  # an earlier run's rows are not this run's
        state_every = settings.save_every or DEFAULT_STATE_EVERY
        clip_schedule = clip_limits(settings)
        previewer = None
        if settings.previews.every:
            previewer = PreviewRenderer(base, settings.previews, settings.name, settings.clip_skip, unet=raw_unet)
        files = _run_files(settings, method, out_dir, done.resumed_from)
        stopped_early_at = None
        train_modules = method.train_modules()
        with torch.enable_grad():
            for step in range(done.step + 1, schedule.end_step + 1):
                for module in train_modules:
                    module.train()
                rate = schedule.rate_at(step)
                loss = _optimizer_step(trainer, optimizer, scaler, step, rate, clip_schedule(step))
                done.step = step
                done.losses.append(loss)
                done.rates.append(rate)
                checkpoint = bool(settings.save_every) and step % settings.save_every == 0
                if checkpoint:
                    files.update(method.save_checkpoint(out_dir, step, optimizer))
                if checkpoint or step == schedule.end_step:
                    evaluator.evaluate(done)
                if previewer is not None and step % settings.previews.every == 0:
                    with eval_mode(train_modules):
                        files.update(previewer.save(method.encode, trainer.last_prompt, step, out_dir,
                                                    method.preview_data(step)))
                if checkpoint and step < schedule.end_step and _stops_early(evaluator, done, settings, log):
                    stopped_early_at = step
                elif step % state_every == 0 and step < schedule.end_step:
                    save_state(state_path, _capture(trainer, optimizer, scaler, done, key, evaluator.key))
                if progress is not None:
                    progress(step, loss)
                if stopped_early_at is not None:
                    break
        for module in train_modules:
            module.eval()
        if save_final is not None:
            final_files = save_final(done.step, optimizer)
    files.update(final_files)
    steps = done.step
    files["loss_csv"] = write_loss_csv(out_dir / "loss.csv", done.losses, done.rates, steps - len(done.losses) + 1)
    files["loss_png"] = plot_loss(files["loss_csv"], out_dir / "loss.png", f"{method.label}: {settings.name}")
    if evaluator.validation is not None:
        files["validation_csv"] = evaluator.csv_path
    state_path.unlink(missing_ok=True)  # finished: the final files are the result, nothing to resume
    return LoopResult(
        steps=steps, losses=done.losses, rates=done.rates, files=files, optimizer=optimizer,
        resumed_from=done.resumed_from,
        images_encoded=trainer.encoded + (evaluator.validation.encoded if evaluator.validation else 0),
        validations=list(done.evaluations), stopped_early_at=stopped_early_at,
    )  # fmt: skip
