"""The settings that decide what a prepared image looks like, named as the webui's "Preprocess images" tab
and kohya's bucketing name them. Their fingerprint is half of every cache key."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from PIL import Image

from common.hashing import json_sha256

RESAMPLE_FILTERS: dict[str, Image.Resampling] = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
CROP_MODES = ("centre", "focal", "split", "auto", "buckets")


@dataclass(frozen=True)
class PrepareOptions:
    """Every option that changes the prepared pixels (and nothing else: worker counts are not here, so they
    never invalidate the cache)."""

    size: int = 512
    flip: bool = False
    greyscale: bool = False
    resample: str = "lanczos"
    background: tuple[int, int, int] = (255, 255, 255)
    min_side: int = 1
    max_pixels: int = 89_478_485
    crop: str = "centre"
    # focal: webui "Auto focal point crop" weights
    focal_crop_face_weight: float = 0.9
    focal_crop_entropy_weight: float = 0.15
    focal_crop_edges_weight: float = 0.5
    # split: webui "Split oversized images"
    split_threshold: float = 0.5
    overlap_ratio: float = 0.2
    # auto: webui "Auto-sized crop"
    multicrop_mindim: int = 384
    multicrop_maxdim: int = 768
    multicrop_minarea: int = 64 * 64
    multicrop_maxarea: int = 640 * 640
    multicrop_objective: str = "area"
    multicrop_threshold: float = 0.1
    # buckets: kohya "enable_bucket" (max area = size x size)
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = True

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"preprocess size must be a positive number of pixels, got {self.size}")
        if self.resample not in RESAMPLE_FILTERS:
            raise ValueError(f"unknown resample filter {self.resample!r}; choose one of {sorted(RESAMPLE_FILTERS)}")
        if self.crop not in CROP_MODES:
            raise ValueError(f"unknown crop mode {self.crop!r}; choose one of {list(CROP_MODES)}")
        if self.multicrop_objective not in ("area", "error"):
            raise ValueError(f"multicrop_objective must be 'area' or 'error', got {self.multicrop_objective!r}")
        if not 0 <= self.overlap_ratio < 1:
            raise ValueError(f"overlap_ratio must be in [0, 1), got {self.overlap_ratio}")
        if self.bucket_reso_steps < 1 or self.min_bucket_reso > self.max_bucket_reso:
            raise ValueError("bucket_reso_steps must be positive and min_bucket_reso at most max_bucket_reso")
        if len(self.background) != 3 or not all(0 <= int(c) <= 255 for c in self.background):
            raise ValueError(f"background must be three 0-255 values (R, G, B), got {self.background!r}")
        # YAML and JSON give lists; the fingerprint and the hash of the frozen dataclass need a tuple.
        object.__setattr__(self, "background", tuple(int(c) for c in self.background))

    def fingerprint(self) -> str:
        """Part of every cache key, so changing any option invalidates exactly the outputs it affects."""
        return json_sha256(dataclasses.asdict(self))
