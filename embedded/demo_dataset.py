"""The demo dataset: one small, always-identical character drawn on many backgrounds, so the whole pipeline
(decoding, tagging, captions, training an embedding of that character) runs with nothing downloaded.

The set deliberately mixes file kinds (PNG, a few JPEGs, one RGBA PNG with transparency) so every decoder
path of the real pipeline is exercised by the demo too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

DEMO_CHARACTER = "pip_(demo)"  # the demo character's tag, as a character tag of the tiny WD14 tagger
SUPERSAMPLE = 4  # draw the character this much larger, then downscale: smooth edges at any size
FACE_ORANGE = (245, 140, 40)
HAT_BLUE = (40, 70, 200)
TRANSPARENT_INDEX = 1  # this image is saved as RGBA with a transparent background
JPEG_EVERY, JPEG_OFFSET = 8, 3  # images 3, 11, 19, ... are saved as JPEG
BACKGROUND_KINDS = ("flat", "gradient", "stripes", "noise")
# Background colours; none is close to the face orange, so the character always stands out.
PALETTE = (
    (255, 255, 255), (200, 200, 205), (90, 150, 235), (20, 30, 80), (70, 170, 80), (170, 230, 190),
    (200, 40, 40), (240, 170, 200), (15, 15, 20), (240, 225, 90), (130, 80, 170), (40, 120, 200),
)

DEMO_DATASET_YAML = """\
# The demo dataset: a small synthetic character ("pip") drawn by embedded/demo_dataset.py.
# One section per stage: editing a section makes only that stage (and what reads its output) unsynced.

preprocess:  # square crop, resize and flipped copies of the raw images
  size: 64            # the tiny demo model works at 64x64 (SD 1.5: 512)
  flip: true
  resample: lanczos

tagging:  # which tagger scores the prepared images (the tagger resource points at the tiny WD14 model)
  tagger: wd14
  batch_size: 16

captions:  # thresholds and formatting that turn tag scores into captions ([filewords])
  general_threshold: 0.35
  character_threshold: 0.85
  include_rating: false
  replace_underscores: true
  escape_brackets: true
  sort_alphabetically: false
  exclude_tags: ["pip_(demo)"]   # the concept being learned is [name], not a caption word

training:  # textual inversion of the demo character, webui option names
  embedding_name: pip
  initialization_text: character
  vectors_per_token: 2
  learning_rate: "0.005"
  batch_size: 8
  gradient_accumulation_steps: 4
  max_steps: 100
  template: subject_filewords
  save_embedding_every: 50

evaluation:  # X/Y/Z grid: checkpoints (x) by prompts (y), one block per seed (z); metrics per checkpoint
  prompts:
    - "a photo of [name]"
    - "[name] on a white background"
  seeds: [1, 2, 3]
  steps: 12
  clip_model: models/tiny-clip   # CLIP scores of the cells (a random tiny CLIP: the numbers only prove the path)

aesthetic:  # aesthetic-gradients embedding of the prepared images (asset aesthetic_embedding, on demand)
  clip_model: models/tiny-clip   # its text tower is the tiny SD's text encoder, as ViT-L/14's is SD 1.x's
  batch_size: 16
"""


def demo_dataset_yaml() -> str:
    """The dataset.yaml text written beside the demo images."""
    return DEMO_DATASET_YAML


def build_demo_dataset(out_dir: Path, *, count: int = 32, side: int = 96, seed: int = 0) -> Path:
    """Draw `count` images of the demo character into `out_dir` (which must be new or empty) and return it.

    The folder is built beside the target and renamed into place, so a reader never sees half a dataset.
    An existing non-empty folder is refused rather than overwritten: it may hold a user's own images.
    """
    out_dir = Path(out_dir)
    if count < 1:
        raise ValueError(f"demo dataset count must be at least 1, got {count}")
    if side < 32:
        raise ValueError(f"demo dataset side must be at least 32 pixels, got {side}")
    _refuse_non_empty(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        for index in range(count):
            _save_demo_image(staging, index, side=side, seed=seed)
        (staging / "dataset.yaml").write_text(demo_dataset_yaml(), encoding="utf-8")
        staging.chmod(0o755)
        _refuse_non_empty(out_dir)
        os.replace(staging, out_dir)  # replaces an empty directory, fails on a non-empty one
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(staging)
    return out_dir


def _refuse_non_empty(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(
            f"{out_dir} already exists and is not an empty folder; the demo dataset is never written over "
            "existing files (they may be your own images). Choose a new folder or remove this one."
        )


def _save_demo_image(folder: Path, index: int, *, side: int, seed: int) -> None:
    # One generator per image: image i is the same whatever `count` is.
    rng = np.random.default_rng([seed, index])
    transparent = index == TRANSPARENT_INDEX
    if transparent:
        canvas = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    else:
        kind = BACKGROUND_KINDS[index % len(BACKGROUND_KINDS)]
        canvas = Image.fromarray(_background(rng, side, kind)).convert("RGBA")
    _paste_character(canvas, rng)
    if transparent:
        canvas.save(folder / f"demo_{index:03d}.png", format="PNG")
    elif index % JPEG_EVERY == JPEG_OFFSET:
        canvas.convert("RGB").save(folder / f"demo_{index:03d}.jpg", format="JPEG", quality=92)
    else:
        canvas.convert("RGB").save(folder / f"demo_{index:03d}.png", format="PNG")


def _background(rng: np.random.Generator, side: int, kind: str) -> np.ndarray:
    """(side, side, 3) uint8 background of one of the BACKGROUND_KINDS."""
    first, second = (np.array(PALETTE[i], dtype=np.float64) for i in rng.choice(len(PALETTE), 2, replace=False))
    rows, cols = np.mgrid[0:side, 0:side].astype(np.float64)
    along = (rows, cols, (rows + cols) / 2)[int(rng.integers(3))]
    if kind == "flat":
        pixels = np.broadcast_to(first, (side, side, 3))
    elif kind == "gradient":
        ramp = (along / (side - 1))[..., None]
        pixels = first * (1 - ramp) + second * ramp
    elif kind == "stripes":
        half_period = int(rng.integers(4, 13))
        pixels = np.where(((along // half_period) % 2 == 0)[..., None], first, second)
    else:
        pixels = first + rng.normal(0.0, 40.0, size=(side, side, 3))
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def _paste_character(canvas: Image.Image, rng: np.random.Generator) -> None:
    side = canvas.width
    size = int(round(side * rng.uniform(0.45, 0.7)))
    sprite = _character_sprite(size * SUPERSAMPLE)
    sprite = sprite.rotate(float(rng.uniform(-15, 15)), resample=Image.Resampling.BICUBIC, expand=True)
    sprite = sprite.resize(
        (max(1, round(sprite.width / SUPERSAMPLE)), max(1, round(sprite.height / SUPERSAMPLE))),
        Image.Resampling.LANCZOS,
    )
    left = int(rng.integers(0, max(1, side - sprite.width + 1)))
    top = int(rng.integers(0, max(1, side - sprite.height + 1)))
    canvas.alpha_composite(sprite, (left, top))


def _character_sprite(size: int) -> Image.Image:
    """The demo character on a transparent square: round orange face, two eyes, a smile, a blue pointed hat."""
    sprite = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(sprite)

    def box(x0: float, y0: float, x1: float, y1: float) -> tuple[int, int, int, int]:
        return round(x0 * size), round(y0 * size), round(x1 * size), round(y1 * size)

    line = max(1, round(size * 0.02))
    draw.ellipse(box(0.2, 0.32, 0.8, 0.92), fill=(*FACE_ORANGE, 255), outline=(190, 90, 20, 255), width=line)
    for centre in (0.39, 0.61):
        draw.ellipse(box(centre - 0.045, 0.52, centre + 0.045, 0.64), fill=(30, 30, 40, 255))
        draw.ellipse(box(centre - 0.02, 0.54, centre + 0.005, 0.57), fill=(255, 255, 255, 255))
    draw.arc(box(0.38, 0.62, 0.62, 0.82), start=20, end=160, fill=(30, 30, 40, 255), width=line)
    hat = [(0.28 * size, 0.41 * size), (0.72 * size, 0.41 * size), (0.56 * size, 0.02 * size)]
    draw.polygon(hat, fill=(*HAT_BLUE, 255))
    draw.ellipse(box(0.2, 0.36, 0.8, 0.46), fill=(30, 50, 160, 255))
    draw.ellipse(box(0.46, 0.2, 0.54, 0.28), fill=(250, 220, 60, 255))
    return sprite
