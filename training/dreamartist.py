"""DreamArtist / Advanced Prompt Tuning (APT): a positive and a negative embedding trained together.

What the DreamArtist webui extension does, and so what we do: the UNet runs once on the batch doubled,
conditioned on the prompt with `<name>-neg` (first half) and on the prompt with `<name>` (second half); the
two predictions are combined as generation combines them, `neg + cfg * (pos - neg)`, and that combination is
what the loss sees. The negative embedding thereby learns what the images are *not*, which is why it belongs
in the negative prompt when the pair is used. Options, all from the extension:

- the training CFG scale is a number (`3`) or a dynamic range `lo-hi` with a shape (`2.5-5:cos`); the
  extension moves along the range with each sample's *diffusion timestep* (t / (T - 1)), not with the
  training step, and so do we;
- an exponential moving average of each embedding (the seeds: 0.95-0.97), which the extension copies back
  into the trained vectors every N steps;
- a reconstruction loss: the predicted clean latents decoded by the VAE with gradients, L1 to the image;
- positive-only filewords: the negative prompt is the template line without the caption.

Nothing here evaluates user text: the schedule is parsed by one strict regular expression.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler

from common.hashing import bytes_sha256
from training.acceleration import autocast
from training.base_model import BaseModel
from training.diffusion_objective import noise_scheduler, predicted_clean_latents
from training.embedding_formats import save_diffusers_embedding, save_kohya_embedding, save_webui_optim, save_webui_pt
from training.latent_cache import load_training_image
from training.negative_embedding import negative_embedding_path, negative_name
from training.optimizers import WEBUI_OPTIMIZER_NAMES
from training.prompt_encoding import encode_with_vectors, initial_vectors
from training.templates import FILEWORDS_KEYWORD, NAME_KEYWORD, render_prompt
from training.textual_inversion import TextualInversionSettings, check_prompts_fit, starting_vectors
from training.training_loop import Batch, LoopResult, TrainingExample, TrainingMethod, run_training

CFG_SHAPES = ("linear", "cos", "cos2")
_SHAPE_ALIASES = {"ln": "linear"}  # the extension's own name for the linear shape
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_CFG_PATTERN = re.compile(
    rf"\s*(?P<low>{_NUMBER})(?:\s*-\s*(?P<high>{_NUMBER}))?\s*(?::\s*(?P<shape>[a-z0-9]+))?\s*"
)
_CFG_SYNTAX = 'expected a number ("3") or a range "low-high" with an optional shape ("2.5-5", "2.5-5:cos", "1-3:linear")'


@dataclass(frozen=True)
class CfgSchedule:
    """The training CFG scale: `low` at timestep 0 rising to `high` at the last timestep along `shape`."""

    low: float
    high: float
    shape: str = "linear"

    def __post_init__(self) -> None:
        if self.shape not in CFG_SHAPES:
            raise ValueError(f"CFG shape {self.shape!r}: expected one of {', '.join(CFG_SHAPES)}")
        for value in (self.low, self.high):
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"CFG scale {value!r}: must be a finite number of at least 0")

    @property
    def dynamic(self) -> bool:
        return self.low != self.high

    def value(self, k: torch.Tensor | float, n: float) -> torch.Tensor:
        """The scale at position k of n (k = 0 gives `low`, k = n gives `high`); k may be a tensor of them."""
        if n <= 0:
            raise ValueError(f"the CFG range needs n > 0, got {n}")
        rate = torch.as_tensor(k, dtype=torch.float32) / float(n)
        if self.shape == "cos":  # the extension's cos((rate - 1) * pi / 2): fast at first, flat at the end
            rate = torch.cos((rate - 1) * (math.pi / 2))
        elif self.shape == "cos2":  # its 1 - cos(rate * pi / 2): flat at first, fast at the end
            rate = 1 - torch.cos(rate * (math.pi / 2))
        return self.low + (self.high - self.low) * rate

    def for_timesteps(self, timesteps: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
        """One scale per sample from its diffusion timestep, as the extension does (float32, timesteps' device)."""
        if not self.dynamic:
            return torch.full(timesteps.shape, self.low, dtype=torch.float32, device=timesteps.device)
        return self.value(timesteps.float(), num_train_timesteps - 1).to(timesteps.device)


def parse_cfg_schedule(text: str) -> CfgSchedule:
    """`"3"`, `"2.5-5"`, `"2.5-5:cos"`, `"1-3:linear"`; anything else is an error quoting the text."""
    match = _CFG_PATTERN.fullmatch(str(text))
    if match is None:
        raise ValueError(f"CFG scale {text!r}: {_CFG_SYNTAX}")
    low = float(match["low"])
    high = float(match["high"]) if match["high"] is not None else low
    shape = _SHAPE_ALIASES.get(match["shape"] or "linear", match["shape"] or "linear")
    if shape not in CFG_SHAPES:
        raise ValueError(f"CFG scale {text!r}: unknown shape {match['shape']!r}; expected one of {', '.join(CFG_SHAPES)}")
    return CfgSchedule(low, high, shape)


class ExponentialMovingAverage:
    """Shadow copies of named tensors: shadow = decay * shadow + (1 - decay) * current after each update.

    decay 1 keeps the starting values forever, which the extension treats as "EMA off" (and so do callers
    here); decay 0 follows the current values exactly. The shadows are float32 copies that never share
    storage with the tensors they follow, and are part of the saved training state so a resumed run
    continues the same average.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], decay: float) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be between 0 and 1, got {decay}")
        self.decay = float(decay)
        self.shadows = {name: tensor.detach().to(torch.float32).clone() for name, tensor in tensors.items()}

    @torch.no_grad()
    def update(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if set(tensors) != set(self.shadows):
            raise ValueError(f"EMA tensors {sorted(tensors)} differ from the averaged ones {sorted(self.shadows)}")
        for name, tensor in tensors.items():
            shadow = self.shadows[name]
            shadow.mul_(self.decay).add_(tensor.detach().to(device=shadow.device, dtype=torch.float32), alpha=1 - self.decay)

    def state_tensors(self, prefix: str = "ema.") -> dict[str, torch.Tensor]:
        return {f"{prefix}{name}": shadow.detach().to("cpu").clone() for name, shadow in self.shadows.items()}

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor], prefix: str = "ema.") -> None:
        missing = [name for name in self.shadows if f"{prefix}{name}" not in tensors]
        if missing:
            raise ValueError(f"the saved state has no EMA of {', '.join(missing)}")
        for name, shadow in self.shadows.items():
            saved = tensors[f"{prefix}{name}"]
            if saved.shape != shadow.shape:
                raise ValueError(f"the saved EMA of {name} has shape {tuple(saved.shape)}, expected {tuple(shadow.shape)}")
            shadow.copy_(saved.to(device=shadow.device, dtype=torch.float32))


def combined_prediction(
    unet: torch.nn.Module,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    cfg: torch.Tensor | float,
) -> torch.Tensor:
    """`neg + cfg * (pos - neg)` from one UNet call on the doubled batch (negative half first, as the extension).

    cfg is a number or one scale per sample. One call instead of two: the same work for the UNet, half the
    kernel launches, and the two halves see exactly the same noisy latents and timesteps.
    """
    batch = noisy.shape[0]
    output = unet(
        torch.cat([noisy, noisy]), torch.cat([timesteps, timesteps]), encoder_hidden_states=torch.cat([negative, positive])
    ).sample
    from_negative, from_positive = output[:batch], output[batch:]
    scale = torch.as_tensor(cfg, dtype=output.dtype, device=output.device)
    if scale.ndim == 1:
        scale = scale.view(-1, *([1] * (output.ndim - 1)))
    return from_negative + scale * (from_positive - from_negative)


def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents to images in [-1, 1] (unclamped) through the VAE decoder, differentiable."""
    parameter = next(vae.parameters())
    return vae.decode(latents.to(dtype=parameter.dtype) / vae.config.scaling_factor).sample


def reconstruction_loss(
    vae: AutoencoderKL,
    scheduler: DDPMScheduler,
    noisy: torch.Tensor,
    prediction: torch.Tensor,
    timesteps: torch.Tensor,
    images: torch.Tensor,
) -> torch.Tensor:
    """L1 between the image and the VAE decoding of the clean latents the prediction implies.

    The gradient flows through the decoder into the prediction (and so into the embeddings), as in the
    extension, which decodes its x0 with gradients enabled. `images` are the training images in [-1, 1].
    """
    clean = predicted_clean_latents(scheduler, noisy, prediction, timesteps)
    decoded = decode_latents(vae, clean)
    return F.l1_loss(decoded.float(), images.to(device=decoded.device, dtype=torch.float32))


# --- prompts: the negative prompt of each training prompt ----------------------------------------------------


def without_filewords(line: str) -> str:
    """A template line with `[filewords]` and the separator it leaves behind removed (`a photo of [name],
    [filewords]` -> `a photo of [name]`): the extension's "positive filewords only" negative line."""
    text = line.replace(FILEWORDS_KEYWORD, "")
    text = re.sub(r"\s*,(\s*,)+", ",", text)  # ", ," left where the caption was
    text = re.sub(r"\s+,", ",", text)
    text = re.sub(r"\s{2,}", " ", text)
    return text.strip().strip(",").strip()


@dataclass(frozen=True)
class NegativePrompts:
    """Turns a rendered training prompt into its negative prompt: the same template line with `[name]` ->
    `<name>-neg` and the same caption, or (positive_only_filewords) the line without the caption.

    The loop hands over rendered prompts, so the template line and caption are recovered by matching the
    prompt against each line's literal parts; among several matching lines the one leaving the shortest
    caption wins (the caption cannot contain the line's own text then).
    """

    lines: tuple[str, ...]
    name: str
    positive_only_filewords: bool = False

    @property
    def negative(self) -> str:
        return negative_name(self.name)

    def _pattern(self, line: str) -> re.Pattern[str]:
        parts = [re.escape(part.replace(NAME_KEYWORD, self.name)) for part in line.split(FILEWORDS_KEYWORD)]
        if len(parts) == 1:
            return re.compile(parts[0], re.DOTALL)
        return re.compile(parts[0] + "(.*)" + "".join(rf"{part}\1" for part in parts[1:-1]) + parts[-1], re.DOTALL)

    def negative_line(self, line: str) -> str:
        """The template line of the negative prompt (still with [name], and [filewords] unless positive-only)."""
        return without_filewords(line) if self.positive_only_filewords else line

    def __call__(self, prompt: str) -> str:
        matches = []
        for line in self.lines:
            found = self._pattern(line).fullmatch(prompt)
            if found is not None:
                matches.append((len(found.group(1)) if found.groups() else 0, line, found.group(1) if found.groups() else ""))
        if not matches:
            raise ValueError(f"training prompt {prompt!r} matches no line of the prompt template")
        _, line, caption = min(matches, key=lambda match: match[0])
        return render_prompt(self.negative_line(line), self.negative, caption)


# --- the training method ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DreamArtistSettings(TextualInversionSettings):
    """Textual inversion's settings (vectors_per_token is the positive embedding's count, its initialization
    the positive's starting point) plus the extension's."""

    vectors_per_token: int = 3
    learning_rate: str = "0.003"
    negative_vectors: int = 6
    negative_initialization_text: str = "*"
    cfg_scale: str = "3"
    negative_lr_scale: float = 1.0
    ema: float = 0.97
    ema_replace_every: int = 25
    reconstruction_weight: float = 0.0
    positive_only_filewords: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_cfg_schedule(self.cfg_scale)
        if not 0.0 <= self.ema <= 1.0:
            raise ValueError(f"ema must be between 0 and 1, got {self.ema}")
        if not (math.isfinite(self.negative_lr_scale) and self.negative_lr_scale > 0):
            raise ValueError(f"negative_lr_scale must be above 0, got {self.negative_lr_scale}")
        if not (math.isfinite(self.reconstruction_weight) and self.reconstruction_weight >= 0):
            raise ValueError(f"reconstruction_weight must be at least 0, got {self.reconstruction_weight}")

    def extra_limits(self) -> dict[str, tuple[int, int, int | None]]:
        return {**super().extra_limits(), "negative_vectors": (self.negative_vectors, 1, 75),
                "ema_replace_every": (self.ema_replace_every, 0, None)}  # fmt: skip

    def negative(self) -> TextualInversionSettings:
        """The negative embedding seen as a textual-inversion embedding: its name, count and initialization."""
        return TextualInversionSettings(
            name=negative_name(self.name), vectors_per_token=self.negative_vectors,
            initialization_text=self.negative_initialization_text, template=self.template,
        )  # fmt: skip


# Small noise on the negative start, as the extension adds to it, so that a negative initialized like the
# positive does not begin as its copy (which would make neg + cfg * (pos - neg) blind to both at first).
NEGATIVE_START_NOISE = 1e-3


def starting_pair(base: BaseModel, settings: DreamArtistSettings, out_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The positive embedding's start as textual inversion's (initialization_embedding, else the text), the
    negative's from its own initialization text, plus NEGATIVE_START_NOISE drawn from a generator of the seed."""
    positive, _ = starting_vectors(base, replace(settings, overwrite_old_embedding=True), out_dir)
    negative = initial_vectors(base.tokenizer, base.text_encoder, settings.negative_initialization_text,
                               settings.negative_vectors)  # fmt: skip
    generator = torch.Generator().manual_seed(settings.seed)
    return positive, negative + torch.randn(negative.shape, generator=generator) * NEGATIVE_START_NOISE


def single_group_state(state: dict[str, Any], group: int) -> dict[str, Any]:
    """One parameter group of an optimizer state as a one-group state: the webui's `.optim` of one embedding
    must load into its own single-tensor AdamW."""
    param_group = {key: value for key, value in state["param_groups"][group].items() if key != "lr_scale"}
    ids = param_group["params"]
    param_group["params"] = list(range(len(ids)))
    return {"state": {new: state["state"][old] for new, old in enumerate(ids) if old in state["state"]},
            "param_groups": [param_group]}  # fmt: skip


class DreamArtistMethod(TrainingMethod):
    """Two embeddings, `<name>` and `<name>-neg`, trained through the CFG combination of their predictions."""

    label = "dreamartist"

    def __init__(
        self, base: BaseModel, settings: DreamArtistSettings, examples: Sequence[TrainingExample],
        positive: torch.Tensor, negative: torch.Tensor,
    ) -> None:  # fmt: skip
        self.base, self.settings, self.examples = base, settings, list(examples)
        self.start = {"positive": positive.detach().clone(), "negative": negative.detach().clone()}
        self.positive = torch.nn.Parameter(positive.detach().clone().to(base.device))
        self.negative = torch.nn.Parameter(negative.detach().clone().to(base.device))
        self.cfg = parse_cfg_schedule(settings.cfg_scale)
        self.scheduler = noise_scheduler(base)
        self.ema = ExponentialMovingAverage(self._live(), settings.ema) if settings.ema < 1 else None
        self.negatives: NegativePrompts | None = None

    def _live(self) -> dict[str, torch.Tensor]:
        return {"positive": self.positive, "negative": self.negative}

    def parameter_groups(self) -> list[dict[str, Any]]:
        return [{"params": [self.positive]}, {"params": [self.negative], "lr_scale": self.settings.negative_lr_scale}]

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """The positive embedding's conditioning (validation loss and previews use it alone)."""
        return encode_with_vectors(self.base.tokenizer, self.base.text_encoder, prompts, self.settings.name,
                                   self.positive, self.settings.clip_skip)  # fmt: skip

    def encode_negative(self, prompts: list[str]) -> torch.Tensor:
        return encode_with_vectors(self.base.tokenizer, self.base.text_encoder, prompts, negative_name(self.settings.name),
                                   self.negative, self.settings.clip_skip)  # fmt: skip

    def loss(self, batch: Batch, unet: torch.nn.Module) -> torch.Tensor:
        if self.negatives is None:
            raise RuntimeError("check_prompts must run before the first loss (the loop calls it)")
        negative_prompts = [self.negatives(prompt) for prompt in batch.prompts]
        cfg = self.cfg.for_timesteps(batch.timesteps, self.scheduler.config.num_train_timesteps)
        with autocast(batch.latents.device, batch.compute_dtype):
            prediction = combined_prediction(
                unet, batch.noisy, batch.timesteps, self.encode(batch.prompts), self.encode_negative(negative_prompts), cfg
            )
        loss = F.mse_loss(prediction.float(), batch.target.float())
        if self.settings.reconstruction_weight:
            multiple = self.base.vae_scale_factor
            images = torch.stack([load_training_image(Path(self.examples[index].image_path), multiple)
                                  for index in batch.indices])  # fmt: skip
            with autocast(batch.latents.device, batch.compute_dtype):
                rebuilt = reconstruction_loss(self.base.vae, self.scheduler, batch.noisy, prediction, batch.timesteps, images)
            loss = loss + self.settings.reconstruction_weight * rebuilt
        return loss

    def after_step(self, step: int) -> None:
        """The extension's EMA: average after each step; every ema_replace_every steps the vectors become it."""
        if self.ema is None:
            return
        self.ema.update(self._live())
        every = self.settings.ema_replace_every
        if every and step % every == 0:
            with torch.no_grad():
                for name, tensor in self._live().items():
                    tensor.copy_(self.ema.shadows[name].to(tensor.device, tensor.dtype))

    def result(self) -> dict[str, torch.Tensor]:
        """What is saved: the EMA copies when EMA is on, else the trained vectors (float32 CPU)."""
        tensors = self.ema.shadows if self.ema is not None else self._live()
        return {name: tensor.detach().to("cpu", torch.float32).clone() for name, tensor in tensors.items()}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        live = {name: tensor.detach().to("cpu", torch.float32).clone() for name, tensor in self._live().items()}
        return {**live, **(self.ema.state_tensors() if self.ema is not None else {})}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, tensor in self._live().items():
                tensor.copy_(tensors[name].to(tensor.device, tensor.dtype))
        if self.ema is not None:
            self.ema.load_state_tensors(tensors)

    def run_identity(self) -> dict[str, Any]:
        return {name: bytes_sha256(tensor.to(torch.float32).numpy().tobytes()) for name, tensor in self.start.items()}

    def check_prompts(self, examples: Sequence[TrainingExample], lines: list[str]) -> None:
        """Both prompts of every image must keep their embedding within CLIP's limit (named image otherwise)."""
        self.negatives = NegativePrompts(tuple(lines), self.settings.name, self.settings.positive_only_filewords)
        check_prompts_fit(self.base, examples, lines, self.settings)
        negative_lines = [self.negatives.negative_line(line) for line in lines]
        check_prompts_fit(self.base, examples, negative_lines, self.settings.negative())

    def checkpoint_files(self, out_dir: Path, step: int) -> dict[str, Path]:
        stem = Path(out_dir) / "checkpoints" / f"{self.settings.name}-{step}"
        files = {f"checkpoint_{step}_webui_pt": stem.with_suffix(".pt"),
                 f"checkpoint_{step}_diffusers": stem.with_suffix(".safetensors")}  # fmt: skip
        return {**files, **{key.replace(f"{step}_", f"{step}_negative_"): negative_embedding_path(path)
                            for key, path in files.items()}}  # fmt: skip

    def _save_pair(self, pt_path: Path, diffusers_path: Path, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Both embeddings as webui `.pt` (+ `.optim` of its own parameter group) and diffusers files; the
        negative's beside the positive's with `-neg` in the name."""
        state = optimizer.state_dict()
        optimizer_name = WEBUI_OPTIMIZER_NAMES[self.settings.optimizer]
        for group, (kind, vectors) in enumerate(self.result().items()):
            name = self.settings.name if kind == "positive" else negative_name(self.settings.name)
            pt = pt_path if kind == "positive" else negative_embedding_path(pt_path)
            save_webui_pt(pt, name, vectors, step, self.base.short_hash, self.base.name)
            save_webui_optim(pt, vectors, single_group_state(state, group), optimizer_name)
            diffusers = diffusers_path if kind == "positive" else negative_embedding_path(diffusers_path)
            save_diffusers_embedding(diffusers, name, vectors, step=step)

    def save_checkpoint(self, out_dir: Path, step: int, optimizer: torch.optim.Optimizer) -> dict[str, Path]:
        files = self.checkpoint_files(out_dir, step)
        self._save_pair(files[f"checkpoint_{step}_webui_pt"], files[f"checkpoint_{step}_diffusers"], step, optimizer)
        return files

    def save_final(self, out_dir: Path, step: int, optimizer: torch.optim.Optimizer) -> dict[str, Path]:
        """`<name>.pt`/`<name>-neg.pt` (+ `.optim`), `learned_embeds[-neg].safetensors`, kohya's `<name>[-neg]`."""
        out_dir, name = Path(out_dir), self.settings.name
        files = {"webui_pt": out_dir / f"{name}.pt", "diffusers": out_dir / "learned_embeds.safetensors"}
        self._save_pair(files["webui_pt"], files["diffusers"], step, optimizer)
        result = self.result()
        files["webui_optim"] = Path(f"{files['webui_pt']}.optim")
        files["kohya"] = save_kohya_embedding(out_dir / "kohya" / f"{name}.safetensors", name, result["positive"])
        negative = {f"negative_{key}": negative_embedding_path(path) for key, path in files.items() if key != "kohya"}
        negative["negative_webui_optim"] = Path(f"{negative['negative_webui_pt']}.optim")
        negative["negative_kohya"] = save_kohya_embedding(
            negative_embedding_path(files["kohya"]), negative_name(name), result["negative"]
        )
        return {**files, **negative}


@dataclass
class DreamArtistResult:
    """The saved pair and the loop's record, read like textual inversion's result (steps, losses, files,
    validations, ...) so the asset's metadata and loss checks are shared."""

    positive: torch.Tensor  # (positive vectors, hidden) float32 CPU: what was saved (the EMA when on)
    negative: torch.Tensor
    loop: LoopResult

    @property
    def vectors(self) -> torch.Tensor:
        """Both embeddings stacked (positive rows first): what the data version and the finiteness check see."""
        return torch.cat([self.positive, self.negative])

    steps = property(lambda self: self.loop.steps)
    losses = property(lambda self: self.loop.losses)
    files = property(lambda self: self.loop.files)
    resumed_from = property(lambda self: self.loop.resumed_from)
    images_encoded = property(lambda self: self.loop.images_encoded)
    validations = property(lambda self: self.loop.validations)
    stopped_early_at = property(lambda self: self.loop.stopped_early_at)


def train_dreamartist(
    base: BaseModel,
    examples: Sequence[TrainingExample],
    settings: DreamArtistSettings,
    out_dir: Path,
    *,
    progress: Callable[[int, float], None] | None = None,
    latent_cache: Path | None = None,
    log: Callable[[str], None] | None = None,
    validation_examples: Sequence[TrainingExample] = (),
) -> DreamArtistResult:
    """Train the pair in the shared loop (latent cache, templates, checkpoints, resume, NaN guard, validation,
    previews, loss log), writing both embeddings in every format under `out_dir`. Always a fresh pair from the
    initialization (the extension has no continue-from-file for the pair either)."""
    out_dir = Path(out_dir)
    positive, negative = starting_pair(base, settings, out_dir)
    method = DreamArtistMethod(base, settings, examples, positive, negative)
    if log is not None:
        log(f"dreamartist {settings.name!r} ({settings.vectors_per_token} vectors) and "
            f"{negative_name(settings.name)!r} ({settings.negative_vectors} vectors), CFG {settings.cfg_scale}, "
            f"EMA {settings.ema}, reconstruction weight {settings.reconstruction_weight}")  # fmt: skip
    loop = run_training(
        base, examples, settings, method, out_dir, progress=progress, latent_cache=latent_cache, log=log,
        validation_examples=validation_examples,
        save_final=lambda step, optimizer: method.save_final(out_dir, step, optimizer),
    )  # fmt: skip
    result = method.result()
    return DreamArtistResult(result["positive"], result["negative"], loop)
