"""Textual-inversion training: learn a few token vectors so the frozen model reproduces the training images.

The algorithm is the webui's: VAE latents sampled once per image, a random timestep and noise per sample,
the frozen UNet predicts the noise (or velocity) from the prompt conditioning, and the MSE gradient reaches
only the embedding's vectors through the frozen UNet and text encoder. The loop itself (latents, schedule,
checkpoints, resume, validation, previews) is the shared one in training/training_loop.py; this module is
what makes it textual inversion: the vectors, where they start, and the embedding files.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from common.hashing import bytes_sha256
from training.base_model import BaseModel
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
from training.lr_schedule import parse_schedule
from training.optimizers import WEBUI_OPTIMIZER_NAMES
from training.png_embedding import save_png_embedding
from training.prompt_encoding import (
    NO_SLOT,
    encode_with_vectors,
    fit_vectors,
    initial_vectors,
    tokenize_with_placeholder,
)
from training.templates import NAME_KEYWORD, render_prompt
from training.training_loop import (
    Evaluation,
    LoopSettings,
    TrainingDivergedError,
    TrainingExample,
    TrainingMethod,
    run_training,
)

__all__ = ["Evaluation", "TextualInversionSettings", "TrainingDivergedError", "TrainingExample", "TrainingResult",
           "starting_vectors", "train_textual_inversion"]  # fmt: skip

# Prompt syntax the webui gives meaning to (emphasis, weights, tag separators) cannot be part of a name.
_NAME_PATTERN = re.compile(r"[^\s,()\[\]{}:]+")


@dataclass(frozen=True)
class TextualInversionSettings(LoopSettings):
    vectors_per_token: int = 1
    initialization_text: str = "*"  # tokenised; its vectors repeated/truncated to fit vectors_per_token
    save_image_with_stored_embedding: bool = True  # webui: also write <name>.png (and previews) carrying the embedding
    initialization_embedding: str = ""  # an embedding file whose vectors (repeated/truncated) replace initialization_text
    overwrite_old_embedding: bool = True  # False: start from the existing final <name>.pt in out_dir

    def __post_init__(self) -> None:
        if not _NAME_PATTERN.fullmatch(self.name):
            raise ValueError(f"embedding name {self.name!r}: use one word without spaces or any of , ( ) [ ] {{ }} :")
        super().__post_init__()

    def extra_limits(self) -> dict[str, tuple[int, int, int | None]]:
        return {"vectors_per_token": (self.vectors_per_token, 1, 75)}


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


class TextualInversionMethod(TrainingMethod):
    """The embedding's vectors, spliced into the prompt wherever its name appears; nothing else trains."""

    label = "textual inversion"

    def __init__(self, base: BaseModel, settings: TextualInversionSettings, start: torch.Tensor) -> None:
        self.base, self.settings, self.start = base, settings, start
        self.vectors = torch.nn.Parameter(start.to(base.device))
        self.first_image: Path | None = None

    def parameter_groups(self) -> list[dict[str, Any]]:
        return [{"params": [self.vectors]}]

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return encode_with_vectors(self.base.tokenizer, self.base.text_encoder, prompts, self.settings.name, self.vectors,
                                   self.settings.clip_skip)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"vectors": self.detached()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.vectors.copy_(tensors["vectors"].to(self.vectors.device))

    def is_finite(self) -> bool:
        return bool(torch.isfinite(self.vectors).all())

    def detached(self) -> torch.Tensor:
        return self.vectors.detach().to(device="cpu", dtype=torch.float32).clone()

    def run_identity(self) -> dict[str, Any]:
        return {"start": bytes_sha256(self.start.to(torch.float32).numpy().tobytes())}

    def check_prompts(self, examples: Sequence[TrainingExample], lines: list[str]) -> None:
        check_prompts_fit(self.base, examples, lines, self.settings)
        if self.first_image is None and examples:
            self.first_image = Path(examples[0].image_path)

    def checkpoint_files(self, out_dir: Path, step: int) -> dict[str, Path]:
        stem = out_dir / "checkpoints" / f"{self.settings.name}-{step}"
        return {f"checkpoint_{step}_webui_pt": stem.with_suffix(".pt"),
                f"checkpoint_{step}_diffusers": stem.with_suffix(".safetensors")}  # fmt: skip

    def save_checkpoint(self, out_dir: Path, step: int, optimizer: torch.optim.Optimizer) -> dict[str, Path]:
        paths = self.checkpoint_files(out_dir, step)
        pt_path, safetensors_path = paths.values()
        _save_embedding_pair(self.base, self.settings, self.vectors, step, pt_path, safetensors_path, optimizer)
        return paths

    def preview_data(self, step: int) -> dict[str, Any] | None:
        if not self.settings.save_image_with_stored_embedding:
            return None
        return webui_embedding_dict(self.settings.name, self.vectors, step, self.base.short_hash, self.base.name)

    def save_final(self, out_dir: Path, step: int, optimizer: torch.optim.Optimizer) -> dict[str, Path]:
        """`<name>.pt` (+ `.optim`), `learned_embeds.safetensors`, kohya's file and the webui's PNG card."""
        vectors, name = self.detached(), self.settings.name
        files = {"webui_pt": out_dir / f"{name}.pt", "diffusers": out_dir / "learned_embeds.safetensors"}
        _save_embedding_pair(self.base, self.settings, vectors, step, files["webui_pt"], files["diffusers"], optimizer)
        files["webui_optim"] = Path(f"{files['webui_pt']}.optim")
        files["kohya"] = save_kohya_embedding(out_dir / "kohya" / f"{name}.safetensors", name, vectors)
        if self.settings.save_image_with_stored_embedding and self.first_image is not None:
            files["png_embedding"] = self._save_png_card(vectors, step, out_dir / f"{name}.png")
        return files

    def _save_png_card(self, vectors: torch.Tensor, step: int, path: Path) -> Path:
        """The webui's PNG-embedded form around the first training image (previews are not rendered here)."""
        with Image.open(self.first_image) as picture:
            card = picture.convert("RGB")
        data = webui_embedding_dict(self.settings.name, vectors, step, self.base.short_hash, self.base.name)
        return save_png_embedding(path, card, data)


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

    The shared loop's behaviour (schedule, resume, validation, early stopping, previews) applies; see
    `run_training`. Previews also go, carrying the embedding, to `image_embeddings/`. With
    overwrite_old_embedding off, the dataset's own embedding continues from its step, with its `.optim`.
    """
    out_dir = Path(out_dir)
    point = _starting_point(base, settings, out_dir)
    start, continued, first_step = point.vectors, point.continued, point.step
    if first_step >= parse_schedule(settings.learning_rate, settings.max_steps).end_step:
        raise ValueError(
            f"{continued}: already trained for {first_step} steps and max_steps is {settings.max_steps}; raise "
            "max_steps to train it further (as the webui counts), or set overwrite_old_embedding: true to start over"
        )
    if log is not None:
        log(f"embedding {settings.name!r} {point.origin}")
    method = TextualInversionMethod(base, settings, start)

    def continue_optimizer(optimizer: torch.optim.Optimizer) -> None:
        if continued is not None:
            _continue_optimizer(optimizer, continued, start, settings, log)

    loop = run_training(
        base, examples, settings, method, out_dir, progress=progress, latent_cache=latent_cache, log=log,
        validation_examples=validation_examples, first_step=first_step, on_fresh_start=continue_optimizer,
        save_final=lambda step, optimizer: method.save_final(out_dir, step, optimizer),
    )  # fmt: skip
    return TrainingResult(
        vectors=method.detached(), steps=loop.steps, losses=loop.losses, files=loop.files,
        resumed_from=loop.resumed_from, images_encoded=loop.images_encoded, continued_from=first_step,
        validations=loop.validations, stopped_early_at=loop.stopped_early_at,
    )  # fmt: skip
