"""Optional BLIP captions: a sentence per image from a local `BlipForConditionalGeneration` folder, cached
per (image content, model fingerprint, generation settings) like the tag scores.

Why beside the taggers: a tagger says *what* is in the picture as a list of tags; BLIP says it as a sentence
("a drawing of a cat wearing a hat"), which some users prefer as `[filewords]`, alone or before the tags.
Loading is local only (`local_files_only`, never `trust_remote_code`), and a folder missing a file fails
with its name before any image is read. torch and transformers are imported only when a captioner is made,
so the rest of `tagging` runs without them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from common.hashing import file_sha256, json_sha256
from tagging.images import ImageRejected, load_rgb
from tagging.score_cache import ImageToScore, ResultStore, images_to_run, status_table
from tagging.wd14 import TaggerModelError

CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")
BLIP_COLUMNS = ["image", "image_sha256", "blip_caption"]


class BlipModelError(TaggerModelError):
    """The BLIP folder is missing or incomplete; the message names the folder and the missing file."""


@dataclass(frozen=True)
class BlipSettings:
    """Generation settings; names and defaults follow the webui's BLIP interrogator (`interrogate_clip_*`)."""

    prompt: str = ""  # a prefix the caption continues, e.g. "a picture of"; it stays in the caption
    num_beams: int = 1
    min_length: int = 24
    max_length: int = 48

    def __post_init__(self) -> None:
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be at least 1, got {self.num_beams}")
        if not 0 <= self.min_length <= self.max_length:
            raise ValueError(f"need 0 <= min_length <= max_length, got {self.min_length} and {self.max_length}")


@dataclass(frozen=True)
class CaptionRun:
    captions: pd.DataFrame  # BLIP_COLUMNS, one row per image that has a caption
    status: pd.DataFrame  # STATUS_COLUMNS: processed / reused / skipped (with a reason)
    images_per_second: float


def require_blip_folder(folder: Path) -> None:
    """Fail with the folder and the missing file's name before anything is loaded."""
    if not folder.is_dir():
        raise BlipModelError(f"BLIP folder {folder} does not exist (expected {CONFIG_FILE}, model.safetensors, "
                             f"processor_config.json and tokenizer files)")
    wanted = {CONFIG_FILE: (CONFIG_FILE,), "weights": WEIGHT_FILES, "image processor config": PROCESSOR_FILES,
              "tokenizer": TOKENIZER_FILES}
    missing = [" or ".join(names) for names in wanted.values() if not any((folder / name).is_file() for name in names)]
    if missing:
        raise BlipModelError(f"BLIP folder {folder} is missing {'; '.join(missing)}")


class BlipCaptioner:
    """A loaded BLIP captioning model and its processor, on the caller's device."""

    def __init__(self, folder: Path, *, device: str = "cpu", dtype: object = None) -> None:
        self.model_dir = Path(folder)
        require_blip_folder(self.model_dir)
        import torch
        from transformers import BlipForConditionalGeneration, BlipProcessor

        try:
            self.processor = BlipProcessor.from_pretrained(self.model_dir, local_files_only=True)
            self.model = BlipForConditionalGeneration.from_pretrained(
                self.model_dir, local_files_only=True, dtype=dtype or torch.float32)
        except (OSError, ValueError, KeyError) as error:
            raise BlipModelError(f"BLIP folder {self.model_dir} could not be loaded: {error}") from error
        self.model.to(device).eval()
        self.device, self.dtype = torch.device(device), self.model.dtype
        files = [self.model_dir / CONFIG_FILE, *(p for p in (self.model_dir / n for n in WEIGHT_FILES) if p.is_file())]
        self.fingerprint: str = json_sha256([file_sha256(path) for path in files])
        self.provider = f"torch {self.device.type}"

    def pixels(self, images: Sequence[object]) -> object:
        """The processor's pixel values (resized, rescaled, normalised) for decoded RGB images."""
        return self.processor(images=list(images), return_tensors="pt")["pixel_values"]

    def caption_pixels(self, pixel_values: object, settings: BlipSettings) -> list[str]:
        """One caption per row of `pixel_values`, exactly what `model.generate` decodes to."""
        import torch

        kwargs: dict[str, object] = {}
        if settings.prompt:
            ids = self.processor(text=settings.prompt, return_tensors="pt")["input_ids"]
            kwargs["input_ids"] = ids.repeat(pixel_values.shape[0], 1).to(self.device)
        with torch.inference_mode():
            tokens = self.model.generate(pixel_values=pixel_values.to(self.device, self.dtype), num_beams=settings.num_beams,
                                         min_length=settings.min_length, max_length=settings.max_length, **kwargs)
        return [text.strip() for text in self.processor.batch_decode(tokens, skip_special_tokens=True)]

    def close(self) -> None:
        """Release the model (and its GPU memory) once the run is done."""
        del self.model
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class BlipCaptionStore(ResultStore):
    """Captions of one (model, generation settings): rows of (image_sha256, blip_caption)."""

    def __init__(self, folder: Path, fingerprint: str, settings: BlipSettings) -> None:
        empty = pd.DataFrame({"image_sha256": pd.Series([], dtype=object), "blip_caption": pd.Series([], dtype=object)})
        super().__init__(folder, {"model": fingerprint, "generation": asdict(settings)}, empty)


def caption_with_cache(
    captioner: BlipCaptioner,
    images: Sequence[ImageToScore],
    store: BlipCaptionStore,
    settings: BlipSettings,
    *,
    batch_size: int = 8,
) -> CaptionRun:
    """BLIP captions for `images`, running the model only on contents the store has not captioned with these
    settings. An image that fails to decode is recorded as skipped with its reason; the run continues."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    cached, done = store.load()
    pending = images_to_run(images, done)
    fresh, skipped, started = [], {}, time.perf_counter()
    for start in range(0, len(pending), batch_size):
        decoded, kept = [], []
        for image in pending[start:start + batch_size]:
            try:
                decoded.append(load_rgb(image.path))
                kept.append(image.sha256)
            except ImageRejected as rejected:
                skipped[image.sha256] = rejected.reason
        if decoded:
            texts = captioner.caption_pixels(captioner.pixels(decoded), settings)
            fresh.append(pd.DataFrame({"image_sha256": kept, "blip_caption": texts}))
    seconds = time.perf_counter() - started
    if pending:
        cached = pd.concat([cached, *fresh], ignore_index=True)
        done |= {image.sha256 for image in pending if image.sha256 not in skipped}
        store.save(cached, done)
    status = status_table(images, pending, skipped)
    kept_images = status.loc[status["status"] != "skipped", ["image", "image_sha256"]]
    captions = kept_images.merge(cached.drop_duplicates("image_sha256"), on="image_sha256", how="inner", sort=False)
    ran = len(pending) - len(skipped)
    return CaptionRun(captions=captions[BLIP_COLUMNS].reset_index(drop=True), status=status,
                      images_per_second=ran / seconds if ran and seconds else 0.0)
