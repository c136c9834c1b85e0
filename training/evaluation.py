"""Evaluation grids: render prompts x seeds with a trained embedding, so a person can judge it at a glance.

The embedding goes in through diffusers' own `load_textual_inversion`, the loader users' tools rely on, so a
grid also proves the file loads. Fixed CPU generators per cell make the grid reproducible byte for byte.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
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
from PIL import Image, ImageDraw, ImageFont

from common.atomic import atomic_path
from training.base_model import BaseModel
from training.embedding_formats import read_embedding
from training.prompt_encoding import check_clip_skip, encode_input_ids
from training.templates import render_prompt

SAMPLERS = {
    "ddim": DDIMScheduler,
    "dpm": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "pndm": PNDMScheduler,
}
MIN_CELL_SIZE = 128
FONT_SIZE = 12
PROMPT_COLUMN_WIDTH = 220
MARGIN = 6
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)


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
def prompt_embeddings(pipeline: StableDiffusionPipeline, prompt: str, clip_skip: int) -> torch.Tensor:
    """Conditioning with webui clip-skip numbering (1 = last layer).

    Why not the pipeline's `clip_skip=` argument (which counts skipped layers, webui - 1): diffusers 0.42
    reads `text_encoder.text_model.final_layer_norm`, which transformers 5 removed, so any clip skip
    there raises AttributeError. We tokenize as the pipeline does (including its expansion of
    multi-vector tokens) and run the same text-encoder layers ourselves.
    """
    text = pipeline.maybe_convert_prompt(prompt, pipeline.tokenizer)
    input_ids = pipeline.tokenizer(
        text, padding="max_length", max_length=pipeline.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return encode_input_ids(pipeline.text_encoder, input_ids, clip_skip)


def render_cell(
    pipeline: StableDiffusionPipeline,
    prompt: str,
    negative_prompt: str,
    seed: int,
    steps: int,
    cfg_scale: float,
    clip_skip: int,
) -> Image.Image:
    return render_conditioned(
        pipeline,
        prompt_embeddings(pipeline, prompt, clip_skip),
        prompt_embeddings(pipeline, negative_prompt, clip_skip),
        seed,
        steps,
        cfg_scale,
    )


def render_conditioned(
    pipeline: StableDiffusionPipeline,
    conditioning: torch.Tensor,
    negative_conditioning: torch.Tensor,
    seed: int,
    steps: int,
    cfg_scale: float,
) -> Image.Image:
    """One image from ready conditioning, its noise from its own CPU generator (never torch's global one)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    result = pipeline(
        prompt_embeds=conditioning,
        negative_prompt_embeds=negative_conditioning,
        num_inference_steps=steps,
        guidance_scale=cfg_scale,
        generator=generator,
        output_type="pil",
    )
    return result.images[0]


def _resized(image: Image.Image, size: int) -> Image.Image:
    """NEAREST when enlarging, so tiny images stay crisp pixels instead of blur."""
    if image.size == (size, size):
        return image
    method = Image.Resampling.NEAREST if size > image.width else Image.Resampling.LANCZOS
    return image.resize((size, size), method)


def _wrap(text: str, font: ImageFont.FreeTypeFont, width: int, max_lines: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[: max_lines - 1] + [lines[max_lines - 1] + " ..."]
    return lines


def draw_grid(
    cells: list[list[Image.Image]], prompts: Sequence[str], seeds: Sequence[int], title: str, cell_size: int
) -> Image.Image:
    """A row per prompt (text at the left), a column per seed (label on top), a title line above all."""
    font = ImageFont.load_default(size=FONT_SIZE)
    line_height = FONT_SIZE + 4
    top = MARGIN + line_height + MARGIN + line_height
    width = max(PROMPT_COLUMN_WIDTH + len(seeds) * (cell_size + MARGIN), MARGIN + int(font.getlength(title))) + MARGIN
    height = top + len(prompts) * (cell_size + MARGIN) + MARGIN
    grid = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    draw.text((MARGIN, MARGIN), title, fill=INK, font=font)
    for column, seed in enumerate(seeds):
        x = PROMPT_COLUMN_WIDTH + column * (cell_size + MARGIN)
        draw.text((x, top - line_height), f"seed {seed}", fill=INK, font=font)
    max_lines = max(1, cell_size // line_height)
    for row, (prompt, images) in enumerate(zip(prompts, cells)):
        y = top + row * (cell_size + MARGIN)
        for index, line in enumerate(_wrap(prompt, font, PROMPT_COLUMN_WIDTH - 2 * MARGIN, max_lines)):
            draw.text((MARGIN, y + index * line_height), line, fill=INK, font=font)
        for column, image in enumerate(images):
            grid.paste(_resized(image, cell_size), (PROMPT_COLUMN_WIDTH + column * (cell_size + MARGIN), y))
    return grid


def _save_png(image: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def _check_request(out_path: Path, prompts: Sequence[str], seeds: Sequence[int], steps: int, cell_size: int | None) -> None:
    if "grid" not in out_path.name:
        raise ValueError(f"{out_path}: an evaluation grid's file name must contain 'grid'")
    if not prompts or not seeds:
        raise ValueError("an evaluation grid needs at least one prompt and one seed")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if cell_size is not None and cell_size < 1:
        raise ValueError(f"cell_size must be at least 1, got {cell_size}")


def render_grid(
    pipeline: StableDiffusionPipeline,
    embedding_path: Path,
    prompts: Sequence[str],
    seeds: Sequence[int],
    out_path: Path,
    *,
    name: str,
    steps: int = 20,
    cfg_scale: float = 7.0,
    negative_prompt: str = "",
    clip_skip: int = 1,
    cell_size: int | None = None,
) -> Path:
    """Render `[name]` prompts x seeds into a labelled grid PNG, cells beside it in `<stem>_cells/`.

    The embedding is unloaded afterwards (even on error), so the pipeline and the base model it shares
    come back as they were and can be reused for the next checkpoint.
    """
    embedding_path, out_path = Path(embedding_path), Path(out_path)
    _check_request(out_path, prompts, seeds, steps, cell_size)
    check_clip_skip(pipeline.text_encoder, clip_skip)
    embedding = read_embedding(embedding_path)
    hidden = pipeline.text_encoder.get_input_embeddings().embedding_dim
    if embedding.vectors.shape[1] != hidden:
        raise ValueError(
            f"{embedding_path}: vectors of size {embedding.vectors.shape[1]} do not fit this model's text encoder ({hidden})"
        )
    rendered = [render_prompt(prompt, name, "") for prompt in prompts]
    pipeline.load_textual_inversion(os.fspath(embedding_path), token=name)
    try:
        cells = [
            [render_cell(pipeline, prompt, negative_prompt, seed, steps, cfg_scale, clip_skip) for seed in seeds]
            for prompt in rendered
        ]
    finally:
        pipeline.unload_textual_inversion(embedding_tokens(name, embedding.vectors.shape[0]))
        pipeline.text_encoder.requires_grad_(False)  # unloading installs a fresh, trainable token table
    side = cells[0][0].width
    size = cell_size or max(side, MIN_CELL_SIZE)
    step = f" (step {embedding.step})" if embedding.step is not None else ""
    sampling = f"{type(pipeline.scheduler).__name__}, {steps} steps, CFG {cfg_scale:g}, clip skip {clip_skip}"
    title = f"{name}{step} - {embedding_path.name} - {sampling}"
    cells_dir = out_path.parent / f"{out_path.stem}_cells"
    for row, images in enumerate(cells):
        for seed, image in zip(seeds, images):
            _save_png(image, cells_dir / f"row{row}_seed{seed}.png")
    _save_png(draw_grid(cells, rendered, seeds, title, size), out_path)
    return out_path
