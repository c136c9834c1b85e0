"""DreamBooth's class images: what the base model draws for the class prompt ("a photo of a dog"), so prior
preservation can keep the model's idea of the class while it learns the instance.

Why a content-addressed folder: rendering 50-200 images is the slow part of a DreamBooth run, and the images
depend only on the base model and the sampling settings, never on the training images. Each image is named
by the key of those settings plus its own seed, so re-materialising renders only the images that are
missing (raising `count` renders only the new seeds), and a changed prompt or model replaces the whole set.
Sampling goes through the evaluation grid's pipeline and conditioning (`build_pipeline`, `prompt_embeddings`,
`render_conditioned`), so a class image is exactly what the grid would show for that prompt and seed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from common.atomic import write_text
from common.hashing import json_sha256
from training.base_model import BaseModel
from training.evaluation import SAMPLERS, build_pipeline, prompt_embeddings, render_conditioned, save_png
from training.prompt_encoding import check_clip_skip

MANIFEST = "class_images.json"
CLASS_IMAGES_FORMAT = 1  # bump when rendering changes in a way the key cannot see


@dataclass(frozen=True)
class ClassImageSpec:
    """Everything a class image depends on besides the base model's weights."""

    prompt: str
    size: int  # the training resolution: class latents are batched with the instance latents
    count: int = 50
    negative_prompt: str = ""
    seed: int = 0  # image i is sampled with seed + i
    steps: int = 25
    cfg_scale: float = 7.0
    sampler: str = "dpm"
    clip_skip: int = 1

    def __post_init__(self) -> None:
        if not self.prompt.strip():
            raise ValueError("the class prompt is empty: say what the subject is, e.g. 'a photo of a dog'")
        if self.count < 1:
            raise ValueError(f"the number of class images must be at least 1, got {self.count}")
        if self.steps < 1:
            raise ValueError(f"class image sampling steps must be at least 1, got {self.steps}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"class image sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")

    def seeds(self) -> list[int]:
        return [self.seed + index for index in range(self.count)]


@dataclass
class ClassImages:
    key: str  # the content key of the set (base model and sampling settings, not the seeds)
    paths: list[Path]  # in seed order
    rendered: int = 0  # sampled in this call
    reused: int = 0  # already in the folder
    removed: list[Path] = field(default_factory=list)  # images of another key (or beyond count), deleted


def class_images_key(base_fingerprint: str, spec: ClassImageSpec) -> str:
    """The key every image of the set shares: the base model's content and every sampling input but the seed."""
    settings = {key: value for key, value in asdict(spec).items() if key not in ("count", "seed")}
    return json_sha256({"version": CLASS_IMAGES_FORMAT, "base_model": base_fingerprint, **settings})


def class_image_path(folder: Path, key: str, seed: int) -> Path:
    return Path(folder) / f"{key[:16]}-{seed}.png"


def generate_class_images(
    base: BaseModel,
    spec: ClassImageSpec,
    folder: Path,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> ClassImages:
    """The folder holds exactly the spec's images afterwards: missing ones are sampled (each written atomically,
    so a killed run keeps the finished ones), others are removed, and `class_images.json` lists them."""
    folder = Path(folder)
    if spec.size % base.vae_scale_factor:
        raise ValueError(f"class image size {spec.size} is not a multiple of the VAE's factor {base.vae_scale_factor}")
    check_clip_skip(base.text_encoder, spec.clip_skip)
    key = class_images_key(base.fingerprint, spec)
    wanted = {class_image_path(folder, key, seed): seed for seed in spec.seeds()}
    missing = [path for path in wanted if not path.is_file()]
    removed = sorted(set(folder.glob("*.png")) - set(wanted)) if folder.is_dir() else []
    for path in removed:
        path.unlink()
    if missing:
        pipeline = build_pipeline(base, spec.sampler)
        conditioning = prompt_embeddings(pipeline, spec.prompt, spec.clip_skip)
        negative = prompt_embeddings(pipeline, spec.negative_prompt, spec.clip_skip)
        for done, path in enumerate(missing, start=1):
            with torch.no_grad():
                image = render_conditioned(
                    pipeline, conditioning, negative, wanted[path], spec.steps, spec.cfg_scale, spec.size
                )
            save_png(image, path)
            if progress is not None:
                progress(done, len(missing))
    paths = list(wanted)
    write_text(folder / MANIFEST, json.dumps({
        "key": key, "base_model": base.fingerprint, **asdict(spec), "images": [path.name for path in paths],
    }, indent=2))  # fmt: skip
    return ClassImages(key, paths, rendered=len(missing), reused=len(paths) - len(missing), removed=removed)


def read_class_images(folder: Path) -> list[Path]:
    """The class images the last generation listed; a missing manifest or image fails naming it."""
    manifest = Path(folder) / MANIFEST
    if not manifest.is_file():
        raise ValueError(f"{manifest} is missing: generate the class images first")
    try:
        names = json.loads(manifest.read_text(encoding="utf-8"))["images"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{manifest}: not a class image manifest ({error})") from error
    paths = [Path(folder) / name for name in names]
    absent = [path for path in paths if not path.is_file()]
    if absent:
        raise ValueError(f"{absent[0]}: class image listed in {manifest} is missing; generate the class images again")
    return paths
