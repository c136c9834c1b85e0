"""Evaluation grids: render a trained method's checkpoints over prompts, seeds and settings, so a person can
judge them at a glance (the webui's X/Y/Z plot).

An embedding goes in through diffusers' own `load_textual_inversion`, the loader users' tools rely on, so a
grid also proves the file loads. Fixed CPU generators per cell make a cell reproducible byte for byte, which
is what lets a content-addressed cache keep every cell whose inputs did not change.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
)
from PIL import Image

from common.atomic import atomic_path, write_bytes
from common.hashing import cached_file_sha256, json_sha256
from training.aesthetic import AestheticGradients
from training.base_model import BaseModel
from training.embedding_formats import read_embedding
from training.hypernetwork import Hypernetwork
from training.hypernetwork_attention import apply_hypernetwork
from training.negative_embedding import negative_embedding_path, negative_name
from training.prompt_encoding import check_clip_skip, encode_input_ids
from training.templates import render_prompt
from training.weight_swap import swapped_weights
from training.xyz_grid import CellSpec, Checkpoint, GridPlan, draw_grid, fixed_legend

SAMPLERS = {
    "ddim": DDIMScheduler,
    "dpm": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "pndm": PNDMScheduler,
}
CELL_FORMAT = 1  # bump when rendering changes in a way the cache key cannot see


def build_pipeline(base: BaseModel, sampler: str = "dpm") -> StableDiffusionPipeline:
    """A pipeline over the already-loaded components: nothing is read from disk again."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    pipeline = StableDiffusionPipeline(
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        unet=base.unet,
        scheduler=SAMPLERS[sampler].from_config(base.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def embedding_tokens(name: str, n_vectors: int) -> list[str]:
    """The tokens diffusers adds for an n-vector embedding loaded with token=name."""
    return [name] + [f"{name}_{index}" for index in range(1, n_vectors)]


@torch.no_grad()
def prompt_embeddings(
    pipeline: StableDiffusionPipeline, prompt: str, clip_skip: int, weighted: Sequence[int] = (), weight: float = 1.0
) -> torch.Tensor:
    """Conditioning with webui clip-skip numbering (1 = last layer), the `weighted` token ids emphasised.

    Why not the pipeline's `clip_skip=` argument (which counts skipped layers, webui - 1): diffusers 0.42
    reads `text_encoder.text_model.final_layer_norm`, which transformers 5 removed, so any clip skip
    there raises AttributeError. We tokenize as the pipeline does (including its expansion of
    multi-vector tokens) and run the same text-encoder layers ourselves.

    Emphasis is the webui's `(token:weight)`: the encoded positions of those tokens are multiplied by the
    weight, then the whole conditioning is rescaled to its original mean, so 1.0 changes nothing.
    """
    text = pipeline.maybe_convert_prompt(prompt, pipeline.tokenizer)
    input_ids = pipeline.tokenizer(
        text, padding="max_length", max_length=pipeline.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    conditioning = encode_input_ids(pipeline.text_encoder, input_ids, clip_skip)
    if weight == 1.0 or not weighted:
        return conditioning
    mask = torch.isin(input_ids, torch.tensor(list(weighted))).to(conditioning.device)
    multipliers = torch.where(mask, weight, 1.0).to(conditioning.dtype)[..., None]
    original_mean = conditioning.float().mean()
    emphasised = conditioning * multipliers
    return emphasised * (original_mean / emphasised.float().mean()).to(conditioning.dtype)


def render_conditioned(
    pipeline: StableDiffusionPipeline,
    conditioning: torch.Tensor,
    negative_conditioning: torch.Tensor,
    seed: int,
    steps: int,
    cfg_scale: float,
    size: int | None = None,
) -> Image.Image:
    """One image from ready conditioning, its noise from its own CPU generator (never torch's global one);
    `size` x `size` pixels, or the model's own resolution when None."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    result = pipeline(
        prompt_embeds=conditioning,
        negative_prompt_embeds=negative_conditioning,
        num_inference_steps=steps,
        guidance_scale=cfg_scale,
        generator=generator,
        output_type="pil",
        height=size,
        width=size,
    )
    return result.images[0]




# How each method's checkpoint is put into the pipeline for a with-block: it yields the prompt encoder to use.
Encoder = Callable[[str], torch.Tensor]


@contextmanager
def textual_inversion_applied(
    pipeline: StableDiffusionPipeline, checkpoint: Checkpoint, strength: float, clip_skip: int
) -> Iterator[Encoder]:
    """The embedding loaded under its name (strength = the webui's `(name:strength)` emphasis), unloaded
    afterwards even on error, so the shared base model comes back as it was."""
    embedding = read_embedding(checkpoint.path)
    hidden = pipeline.text_encoder.get_input_embeddings().embedding_dim
    if embedding.vectors.shape[1] != hidden:
        raise ValueError(
            f"{checkpoint.path}: vectors of size {embedding.vectors.shape[1]} do not fit this model's text encoder ({hidden})"
        )
    tokens = embedding_tokens(checkpoint.name, embedding.vectors.shape[0])
    pipeline.load_textual_inversion(os.fspath(checkpoint.path), token=checkpoint.name)
    try:
        ids = pipeline.tokenizer.convert_tokens_to_ids(tokens)
        yield lambda prompt: prompt_embeddings(pipeline, prompt, clip_skip, ids, strength)
    finally:
        pipeline.unload_textual_inversion(tokens)
        pipeline.text_encoder.requires_grad_(False)  # unloading installs a fresh, trainable token table
        # ...and leaves the config's vocab_size at the loaded size: a save_pretrained of the shared text encoder
        # (DreamBooth's folder) would then not load back.
        pipeline.text_encoder.config.vocab_size = pipeline.text_encoder.get_input_embeddings().num_embeddings


@dataclass(frozen=True)
class AppliedMethod:
    """What an applier yields when the method also changes the negative conditioning (DreamArtist); an applier
    that yields a bare Encoder leaves the negative prompt as the grid's settings give it."""

    encode: Encoder
    negative: Encoder  # the grid's negative prompt text -> the negative conditioning


def with_negative_embedding(negative_prompt: str, name: str) -> str:
    """The negative prompt with the negative embedding's name in front, as DreamArtist pairs are used in the webui."""
    return f"{name}, {negative_prompt}" if negative_prompt.strip() else name


@contextmanager
def dreamartist_applied(
    pipeline: StableDiffusionPipeline, checkpoint: Checkpoint, strength: float, clip_skip: int
) -> Iterator[AppliedMethod]:
    """The positive embedding for `<name>` in the prompt (at `strength`), the negative one, from the file beside it,
    for `<name>-neg` put at the front of the negative prompt; both unloaded afterwards."""
    negative = Checkpoint(
        checkpoint.method, checkpoint.step, negative_embedding_path(checkpoint.path), negative_name(checkpoint.name)
    )
    with textual_inversion_applied(pipeline, checkpoint, strength, clip_skip) as encode:
        with textual_inversion_applied(pipeline, negative, 1.0, clip_skip) as encode_negative:
            yield AppliedMethod(encode, lambda text: encode_negative(with_negative_embedding(text, negative.name)))


@contextmanager
def hypernetwork_applied(
    pipeline: StableDiffusionPipeline, checkpoint: Checkpoint, strength: float, clip_skip: int
) -> Iterator[Encoder]:
    """The webui hypernetwork file on the pipeline's UNet at `strength` (the webui's multiplier); prompts are
    plain text. The UNet's processors are restored afterwards, even on error."""
    hypernetwork = Hypernetwork.load(checkpoint.path).to(pipeline.unet.device).frozen()
    with apply_hypernetwork(pipeline.unet, hypernetwork, strength):
        yield lambda prompt: prompt_embeddings(pipeline, prompt, clip_skip)


@contextmanager
def lora_applied(
    pipeline: StableDiffusionPipeline, checkpoint: Checkpoint, strength: float, clip_skip: int
) -> Iterator[Encoder]:
    """A kohya LoRA file through diffusers' `load_lora_weights` (which converts kohya keys), strength as the
    adapter weight (the webui's `<lora:name:strength>`); unloaded afterwards even on error, so the shared
    UNet and text encoder come back bit for bit."""
    models = (pipeline.unet, pipeline.text_encoder)
    requires_grad = [[parameter.requires_grad for parameter in model.parameters()] for model in models]
    attributes = [set(model.__dict__) for model in models]  # unloading leaves peft markers behind
    try:
        try:
            pipeline.load_lora_weights(os.fspath(checkpoint.path), adapter_name="evaluated")
        except (ValueError, KeyError, OSError) as error:
            raise ValueError(f"{checkpoint.path}: diffusers cannot load this LoRA file: {error}") from error
        pipeline.set_adapters(["evaluated"], adapter_weights=[strength])
        yield lambda prompt: prompt_embeddings(pipeline, prompt, clip_skip)
    finally:
        pipeline.unload_lora_weights()
        for model, flags, names in zip(models, requires_grad, attributes):
            for parameter, flag in zip(model.parameters(), flags):
                parameter.requires_grad_(flag)
            for name in set(model.__dict__) - names:
                delattr(model, name)


@contextmanager
def dreambooth_applied(
    pipeline: StableDiffusionPipeline, checkpoint: Checkpoint, strength: float, clip_skip: int
) -> Iterator[Encoder]:
    """The fine-tuned UNet (and text encoder) of a DreamBooth single file swapped into the pipeline; strength
    is a linear blend of the weights (1: the fine-tune, 0: the base model, 0.5: halfway); restored afterwards."""
    with swapped_weights(pipeline.unet, pipeline.text_encoder, checkpoint.path, strength):
        yield lambda prompt: prompt_embeddings(pipeline, prompt, clip_skip)


METHOD_APPLIERS: dict[str, Callable[..., AbstractContextManager[Encoder | AppliedMethod]]] = {
    "textual_inversion": textual_inversion_applied,
    "hypernetwork": hypernetwork_applied,
    "lora": lora_applied,
    "dreambooth": dreambooth_applied,
    "dreamartist": dreamartist_applied,
}
# Files besides the checkpoint that a method's cells depend on: they must exist, and their hashes join the cell key.
METHOD_COMPANION_FILES: dict[str, Callable[[Checkpoint], list[Path]]] = {
    "dreamartist": lambda checkpoint: [negative_embedding_path(checkpoint.path)],
}


def companion_files(checkpoint: Checkpoint) -> list[Path]:
    return METHOD_COMPANION_FILES.get(checkpoint.method, lambda _: [])(checkpoint)


@dataclass(frozen=True)
class RenderSettings:
    """What every cell of one grid shares, besides its CellSpec."""

    sampler: str
    negative_prompt: str = ""
    clip_skip: int = 1
    base_fingerprint: str = ""
    # The aesthetic-gradients extension applied to every cell's prompt, and what identifies it in the cache
    # (its file's hash and options). It replaces the strength emphasis: the extension encodes the prompt itself.
    aesthetic: AestheticGradients | None = None
    aesthetic_key: str = ""


def cell_key(cell: CellSpec, render: RenderSettings) -> str:
    """The cache key of one image: the checkpoint's content and every input of the sampling loop."""
    key = {
        "version": CELL_FORMAT, "checkpoint": cached_file_sha256(cell.checkpoint.path), "method": cell.method,
        "name": cell.checkpoint.name, "prompt": render_prompt(cell.prompt, cell.checkpoint.name, ""),
        "negative_prompt": render.negative_prompt, "seed": cell.seed, "cfg_scale": cell.cfg_scale,
        "steps": cell.steps, "strength": cell.strength, "sampler": render.sampler, "clip_skip": render.clip_skip,
        "base_model": render.base_fingerprint, "aesthetic": render.aesthetic_key,
    }  # fmt: skip
    companions = [cached_file_sha256(path) for path in companion_files(cell.checkpoint)]
    if companions:  # only then, so the keys of methods without companions stay what they were
        key["companions"] = companions
    return json_sha256(key)


@dataclass(frozen=True)
class RenderedCell:
    spec: CellSpec
    key: str
    cache_path: Path
    rendered: bool  # False: reused from the cache


def _check_checkpoints(cells: Sequence[CellSpec]) -> None:
    for cell in cells:
        if cell.method not in METHOD_APPLIERS:
            raise ValueError(f"no evaluation for method {cell.method!r}; known: {', '.join(METHOD_APPLIERS)}")
        for path in [cell.checkpoint.path, *companion_files(cell.checkpoint)]:
            if not Path(path).is_file():
                raise ValueError(
                    f"{path}: the {cell.method} checkpoint at step {cell.checkpoint.step} no longer "
                    "exists; re-run the training or remove that step from the evaluation checkpoints"
                )


def render_cells(
    pipeline: StableDiffusionPipeline, cells: Sequence[CellSpec], render: RenderSettings, cache_dir: Path
) -> list[RenderedCell]:
    """Each cell from the cache when its key is there; the rest rendered, loading each checkpoint once."""
    _check_checkpoints(cells)
    results: dict[CellSpec, RenderedCell] = {}
    missing: dict[tuple[Checkpoint, float], list[tuple[CellSpec, str, Path]]] = {}
    for cell in dict.fromkeys(cells):
        key = cell_key(cell, render)
        path = Path(cache_dir) / key[:2] / f"{key}.png"
        if path.is_file():
            results[cell] = RenderedCell(cell, key, path, rendered=False)
        else:
            missing.setdefault((cell.checkpoint, cell.strength), []).append((cell, key, path))
    for (checkpoint, strength), todo in missing.items():
        with METHOD_APPLIERS[checkpoint.method](pipeline, checkpoint, strength, render.clip_skip) as applied:
            if isinstance(applied, AppliedMethod):
                encode, negative = applied.encode, applied.negative(render.negative_prompt)
            else:
                encode, negative = applied, prompt_embeddings(pipeline, render.negative_prompt, render.clip_skip)
            for cell, key, path in todo:
                prompt = render_prompt(cell.prompt, checkpoint.name, "")
                if render.aesthetic is not None:
                    conditioning = render.aesthetic.prompt_embeds(pipeline, prompt, render.clip_skip)
                else:
                    conditioning = encode(prompt)
                image = render_conditioned(pipeline, conditioning, negative, cell.seed, cell.steps, cell.cfg_scale)
                save_png(image, path)
                results[cell] = RenderedCell(cell, key, path, rendered=True)
    return [results[cell] for cell in cells]


def save_png(image: Image.Image, path: Path) -> Path:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


@dataclass
class GridResult:
    path: Path
    cells: list[RenderedCell] = field(default_factory=list)
    cell_files: list[Path] = field(default_factory=list)  # the cells copied beside the grid, in cells order


def render_xyz_grid(
    pipeline: StableDiffusionPipeline,
    plan: GridPlan,
    render: RenderSettings,
    out_path: Path,
    cache_dir: Path,
    *,
    title: str,
    cell_size: int | None = None,
) -> GridResult:
    """The grid PNG with its axes and legend, and each cell beside it in `<stem>_cells/`."""
    out_path = Path(out_path)
    if "grid" not in out_path.name:
        raise ValueError(f"{out_path}: an evaluation grid's file name must contain 'grid'")
    if cell_size is not None and cell_size < 1:
        raise ValueError(f"cell_size must be at least 1, got {cell_size}")
    check_clip_skip(pipeline.text_encoder, render.clip_skip)
    layout = plan.cells()
    flat = [cell for block in layout for row in block for cell in row]
    if any(cell.steps < 1 for cell in flat):
        raise ValueError("sampling steps must be at least 1")
    done = render_cells(pipeline, flat, render, cache_dir)
    images = {item.spec: Image.open(item.cache_path).convert("RGB") for item in done}
    cells_dir = out_path.parent / f"{out_path.stem}_cells"
    files = [write_bytes(cells_dir / f"{item.spec.file_stem()}.png", item.cache_path.read_bytes()) for item in done]
    for stale in set(cells_dir.glob("*.png")) - set(files):  # cells of an earlier plan: not this grid's
        stale.unlink()
    sampling = f"{type(pipeline.scheduler).__name__}, clip skip {render.clip_skip}"
    if render.negative_prompt:
        sampling += f", negative prompt: {render.negative_prompt}"
    if render.aesthetic is not None:
        sampling += f", aesthetic gradients (weight {render.aesthetic.options.aesthetic_weight:g})"
    blocks = [[[images[cell] for cell in row] for row in block] for block in layout]
    save_png(draw_grid(plan, blocks, title, fixed_legend(plan) + [sampling], cell_size), out_path)
    return GridResult(out_path, done, files)
