"""CLIP similarities for judging checkpoints: does a generated image look like the training images, and does
it still show what the rest of its prompt asks for?

Why raw cosines: CLIPScore (Hessel et al.) reports 2.5 * max(cos, 0); the clipping hides how negative a bad
pair is and the factor is only cosmetic, so we keep the cosine in [-1, 1] and let the report scale it.
The model is any local CLIP folder in the `openai/clip-vit-large-patch14` layout (config.json, weights,
preprocessor_config.json, tokenizer files); nothing is downloaded and no remote code runs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from transformers import CLIPModel, CLIPTokenizer
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
PROCESSOR_FILE = "preprocessor_config.json"
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))
NAME_KEYWORD = "[name]"

ImageInput = Image.Image | str | Path


class ClipModelError(ValueError):
    """The CLIP folder is missing, incomplete or not a CLIP model; the message names the folder and file."""


def require_clip_folder(folder: Path) -> None:
    """Fail with the folder and what is missing or wrong before any weight is read."""
    if not folder.is_dir():
        raise ClipModelError(f"CLIP model folder {folder} does not exist (expected {CONFIG_FILE}, model.safetensors, "
                             f"{PROCESSOR_FILE} and tokenizer files, as in openai/clip-vit-large-patch14)")
    missing = []
    if not (folder / CONFIG_FILE).is_file():
        missing.append(CONFIG_FILE)
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        missing.append(" or ".join(WEIGHT_FILES))
    if not (folder / PROCESSOR_FILE).is_file():
        missing.append(PROCESSOR_FILE)
    if not any(all((folder / name).is_file() for name in names) for names in TOKENIZER_FILES):
        missing.append("tokenizer.json or vocab.json + merges.txt")
    if missing:
        raise ClipModelError(f"CLIP model folder {folder} is missing {'; '.join(missing)}")
    try:
        model_type = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise ClipModelError(f"{folder / CONFIG_FILE} is not a valid model config: {error}") from error
    if model_type != "clip":
        raise ClipModelError(f"{folder} is not a CLIP model: {CONFIG_FILE} says model_type {model_type!r}, expected "
                             "'clip' (a CLIPModel with both the vision and the text tower)")


def _rgb(image: ImageInput) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        with Image.open(image) as opened:
            return opened.convert("RGB")
    except (OSError, UnidentifiedImageError) as error:
        raise ValueError(f"{image}: cannot be read as an image ({error})") from error


def normalized(features: torch.Tensor) -> torch.Tensor:
    return features / features.norm(dim=-1, keepdim=True)


@dataclass
class ClipScorer:
    """A loaded CLIP model, its image processor and tokenizer, on one device, in eval mode."""

    model: CLIPModel
    processor: CLIPImageProcessorPil
    tokenizer: CLIPTokenizer
    folder: Path
    batch_size: int = 16

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             batch_size: int = 16) -> ClipScorer:
        folder = Path(folder)
        require_clip_folder(folder)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        try:
            model = CLIPModel.from_pretrained(folder, local_files_only=True, dtype=dtype)
            processor = CLIPImageProcessorPil.from_pretrained(folder, local_files_only=True)
            tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError) as error:
            raise ClipModelError(f"CLIP model folder {folder} could not be loaded: {error}") from error
        model.to(device).eval().requires_grad_(False)
        return cls(model=model, processor=processor, tokenizer=tokenizer, folder=folder, batch_size=batch_size)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def pixels(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """The processor's pixel values (resized, centre-cropped, normalised) on the model's device and dtype."""
        values = self.processor(images=[_rgb(image) for image in images], return_tensors="pt")["pixel_values"]
        return values.to(self.device, self.model.dtype)

    @torch.no_grad()
    def _batched(self, items: Sequence, what: str, features) -> torch.Tensor:
        """`features(batch)` over batch_size slices of `items`, as one float32 CPU tensor."""
        if not items:
            raise ValueError(f"no {what} to embed")
        return torch.cat([features(items[start:start + self.batch_size]).pooler_output.float().cpu()
                          for start in range(0, len(items), self.batch_size)])

    def raw_image_features(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """(n, projection_dim) float32 CPU: CLIP's projected image features, not normalised, in batches."""
        return self._batched(images, "images", lambda batch: self.model.get_image_features(pixel_values=self.pixels(batch)))

    def image_embeddings(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """(n, projection_dim) float32 CPU, each row of unit length."""
        return normalized(self.raw_image_features(images))

    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """(n, projection_dim) float32 CPU, unit rows; texts past CLIP's 77 tokens are cut as CLIP cuts them."""

        def features(batch: Sequence[str]):
            tokens = self.tokenizer(list(batch), padding=True, truncation=True, return_tensors="pt")
            return self.model.get_text_features(**tokens.to(self.device))

        return normalized(self._batched(texts, "texts", features))

    def image_similarity(self, generated: Sequence[ImageInput], references: Sequence[ImageInput]) -> torch.Tensor:
        """(len(generated),): each generated image's cosine to the mean of the references' unit embeddings.

        The mean direction, not the mean of per-pair cosines: one number per image saying how close it is to
        the training set as a whole, unmoved by how many near-duplicates the set holds of one picture.
        """
        if not references:
            raise ValueError("no reference images to compare with")
        centre = normalized(self.image_embeddings(references).mean(dim=0))
        return (self.image_embeddings(generated) @ centre).clamp(-1.0, 1.0)

    def text_similarity(self, images: Sequence[ImageInput], texts: Sequence[str]) -> torch.Tensor:
        """(n,): the cosine of each image with its own text (CLIPScore's pairing, raw cosine)."""
        if len(images) != len(texts):
            raise ValueError(f"text_similarity pairs images with texts: got {len(images)} images and {len(texts)} texts")
        pairs = (self.image_embeddings(images) * self.text_embeddings(texts)).sum(dim=-1)
        return pairs.clamp(-1.0, 1.0)


def prompt_without_name(prompt: str, keyword: str = NAME_KEYWORD) -> str:
    """The prompt with every `keyword` removed, so CLIP judges what the rest of the prompt asks for.

    Rule: the keyword goes together with one comma that follows it (or, when none follows, the comma before
    it); then runs of spaces become one, spaces before commas and repeated commas go, and commas or spaces at
    either end are trimmed. "a photo of [name], smiling" -> "a photo of smiling"; "[name], outdoors, night" ->
    "outdoors, night"; "smiling, [name]" -> "smiling"; "[name]" -> "" (nothing left to score).
    """
    if not keyword:
        raise ValueError("keyword must not be empty")
    name = re.escape(keyword)
    text = re.sub(rf"\s*{name}\s*,", " ", prompt)
    text = re.sub(rf"(?:,\s*)?{name}", " ", text)
    text = re.sub(r"\s+,", ",", text)
    text = re.sub(r",(?:\s*,)+", ",", text)
    return re.sub(r"\s+", " ", text).strip(" ,")
