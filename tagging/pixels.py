"""Turning a decoded image into the pixels a tagger was trained on. Kept apart from the tagger classes so
decoding worker processes import only Pillow and numpy, not onnxruntime or TensorFlow.

Workers hand back uint8 arrays (a quarter of float32's bytes through the process pipe); the float cast
happens once per batch in the inference process.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from tagging.images import load_rgb


def wd14_pixels(image: Image.Image, size: int) -> np.ndarray:
    """(size, size, 3) uint8 BGR, exactly as SmilingWolf's reference code prepares images: centred on a
    white square, BICUBIC resize, channels reversed."""
    if image.mode != "RGB":
        raise ValueError(f"WD14 preprocess expects an RGB image (decode with load_rgb), got mode {image.mode}")
    side = max(image.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    if side != size:
        square = square.resize((size, size), Image.Resampling.BICUBIC)
    return np.ascontiguousarray(np.asarray(square, dtype=np.uint8)[:, :, ::-1])


@dataclass(frozen=True)
class PixelRecipe:
    """A picklable description of one tagger's preprocessing, so a worker process can run it on a path."""

    kind: str  # "wd14" or "deepdanbooru"
    size: int

    def from_path(self, path: Path) -> np.ndarray:
        if self.kind == "wd14":
            return wd14_pixels(load_rgb(path), self.size)
        if self.kind == "deepdanbooru":
            from tagging.deepdanbooru import deepdanbooru_pixels  # TensorFlow only where it is used

            return deepdanbooru_pixels(path, self.size)
        raise ValueError(f"unknown pixel recipe {self.kind!r}")
