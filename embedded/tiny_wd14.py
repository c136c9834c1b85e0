"""A tiny WD14 tagger with the exact SmilingWolf contract (a folder with `model.onnx` + `selected_tags.csv`,
NHWC BGR 0-255 input, sigmoid scores), built by the project itself so nothing is downloaded.

Its weights are set by hand, not trained: a few image statistics (colour of the whole image and of its
border, brightness, border flatness, fine detail, and how much of the demo character's orange face and blue
hat is visible) feed one linear layer. So its tags MEAN something on the demo world: a red image gets
`red_theme`, a flat white border gets `white_background`, the demo character gets its character tag. The
seed only nudges the biases slightly, to give distinct but equally meaningful models.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from embedded.demo_dataset import DEMO_CHARACTER
from embedded.wd14_export import INPUT_NAME, export_wd14_onnx, tags_csv  # INPUT_NAME: for callers
from tagging.categories import CHARACTER_CATEGORY, GENERAL_CATEGORY, RATING_CATEGORY

FEATURES = (
    "bias", "mean_r", "mean_g", "mean_b", "luminance", "saturation", "border_std", "detail",
    "white_border", "red_dominance", "blue_dominance", "border_red_dominance", "border_green_dominance",
    "border_blue_dominance", "character",
)
# (name, category, {feature: weight}); the bias entry sets the score when no other feature is active.
TAG_WEIGHTS: tuple[tuple[str, int, dict[str, float]], ...] = (
    ("general", RATING_CATEGORY, {"bias": 4.0}),
    ("sensitive", RATING_CATEGORY, {"bias": -3.5}),
    ("questionable", RATING_CATEGORY, {"bias": -5.0}),
    ("explicit", RATING_CATEGORY, {"bias": -6.0}),
    ("solo", GENERAL_CATEGORY, {"bias": -4.5, "character": 9.0}),
    ("no_humans", GENERAL_CATEGORY, {"bias": -3.0, "character": 7.0}),
    ("hat", GENERAL_CATEGORY, {"bias": -4.0, "character": 8.0}),
    ("smile", GENERAL_CATEGORY, {"bias": -3.5, "character": 6.0}),
    ("looking_at_viewer", GENERAL_CATEGORY, {"bias": -3.0, "character": 4.5}),
    ("simple_background", GENERAL_CATEGORY, {"bias": 3.0, "border_std": -40.0, "detail": -25.0}),
    ("white_background", GENERAL_CATEGORY, {"bias": -25.0, "white_border": 30.0, "border_std": -60.0}),
    ("gradient_background", GENERAL_CATEGORY, {"bias": -3.0, "border_std": 50.0, "detail": -120.0}),
    ("red_background", GENERAL_CATEGORY, {"bias": -3.0, "border_red_dominance": 14.0}),
    ("green_background", GENERAL_CATEGORY, {"bias": -3.0, "border_green_dominance": 14.0}),
    ("blue_background", GENERAL_CATEGORY, {"bias": -3.0, "border_blue_dominance": 14.0}),
    ("red_theme", GENERAL_CATEGORY, {"bias": -3.5, "red_dominance": 14.0}),
    ("blue_theme", GENERAL_CATEGORY, {"bias": -3.5, "blue_dominance": 14.0}),
    ("dark", GENERAL_CATEGORY, {"bias": 5.0, "luminance": -20.0}),
    ("bright", GENERAL_CATEGORY, {"bias": -15.0, "luminance": 20.0}),
    ("monochrome", GENERAL_CATEGORY, {"bias": 2.0, "saturation": -40.0}),
    ("1girl", GENERAL_CATEGORY, {"bias": -5.0}),
    ("^_^", GENERAL_CATEGORY, {"bias": -4.0}),
    (DEMO_CHARACTER, CHARACTER_CATEGORY, {"bias": -6.0, "character": 12.0}),
    ("red_knight_(demo)", CHARACTER_CATEGORY, {"bias": -6.0}),
)
BIAS_JITTER = 0.1  # standard deviation of the seeded nudge to every bias
LUMA = (0.299, 0.587, 0.114)


class TinyWD14(nn.Module):
    """Image statistics -> one hand-set linear layer -> sigmoid, on SmilingWolf's input layout."""

    def __init__(self, side: int, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        ring = max(1, side // 8)
        border = torch.ones(side, side)
        border[ring:-ring, ring:-ring] = 0.0
        self.register_buffer("border", border[None, :, :, None])
        self.register_buffer("luma", torch.tensor(LUMA))
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.features(image) @ self.weight.T + self.bias)

    def features(self, image: torch.Tensor) -> torch.Tensor:
        """(N, side, side, 3) BGR 0-255 -> (N, len(FEATURES)), each feature roughly within 0..1."""
        rgb = torch.flip(image, dims=[3]) / 255.0
        red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
        mean = rgb.mean(dim=(1, 2))
        count = self.border.sum()
        border_mean = (rgb * self.border).sum(dim=(1, 2)) / count
        border_var = (((rgb - border_mean[:, None, None, :]) ** 2) * self.border).sum(dim=(1, 2)) / count
        vertical = (rgb[:, 1:] - rgb[:, :-1]).abs().mean(dim=(1, 2, 3))
        horizontal = (rgb[:, :, 1:] - rgb[:, :, :-1]).abs().mean(dim=(1, 2, 3))
        detail = vertical + horizontal
        orange = _above(red, 0.8) * _above(green, 0.35) * _above(-green, -0.75) * _above(-blue, -0.35)
        orange = orange.mean(dim=(1, 2))
        hat_blue = (_above(blue, 0.6) * _above(-red, -0.35) * _above(-green, -0.45)).mean(dim=(1, 2))
        character = (
            torch.sigmoid(100.0 * (orange - 0.02))
            * torch.sigmoid(30.0 * (0.6 - orange))
            * torch.sigmoid(300.0 * (hat_blue - 0.005))
        )
        columns = [
            torch.ones_like(detail),
            mean[:, 0], mean[:, 1], mean[:, 2],
            (rgb * self.luma).sum(dim=3).mean(dim=(1, 2)),
            (rgb.amax(dim=3) - rgb.amin(dim=3)).mean(dim=(1, 2)),
            border_var.sqrt().mean(dim=1),
            detail,
            border_mean.amin(dim=1),
            _dominance(mean, 0), _dominance(mean, 2),
            _dominance(border_mean, 0), _dominance(border_mean, 1), _dominance(border_mean, 2),
            character,
        ]
        return torch.stack(columns, dim=1)


def _above(values: torch.Tensor, threshold: float) -> torch.Tensor:
    """Soft step: ~1 when values > threshold, ~0 below, smooth in between."""
    return torch.sigmoid(30.0 * (values - threshold))


def _dominance(colour: torch.Tensor, channel: int) -> torch.Tensor:
    """How much one channel exceeds the stronger of the other two (negative when it does not)."""
    others = [c for c in range(3) if c != channel]
    return colour[:, channel] - torch.maximum(colour[:, others[0]], colour[:, others[1]])


def tiny_wd14_module(*, seed: int = 0, side: int = 64) -> TinyWD14:
    """The torch module behind the tiny tagger (exported to ONNX by build_tiny_wd14)."""
    weight = np.zeros((len(TAG_WEIGHTS), len(FEATURES)), dtype=np.float32)
    for row, (_, _, weights) in enumerate(TAG_WEIGHTS):
        for feature, value in weights.items():
            weight[row, FEATURES.index(feature)] = value
    rng = np.random.default_rng(seed)
    bias = rng.normal(0.0, BIAS_JITTER, size=len(TAG_WEIGHTS)).astype(np.float32)
    return TinyWD14(side, torch.from_numpy(weight), torch.from_numpy(bias)).eval()


def selected_tags_csv() -> str:
    """selected_tags.csv text in SmilingWolf's format: ratings first, then general, then character tags."""
    return tags_csv([(name, category, 1000 * (len(TAG_WEIGHTS) - row))
                     for row, (name, category, _) in enumerate(TAG_WEIGHTS)])


def build_tiny_wd14(out_dir: Path, *, seed: int = 0, side: int = 64, fixed_batch: bool = False) -> Path:
    """Write `model.onnx` + `selected_tags.csv` into `out_dir` and return it.

    `fixed_batch=True` exports a batch dimension fixed at 1, like SmilingWolf's v2 models, so that loading
    path is exercised too. Both files are built in a temporary folder that replaces `out_dir` in one rename;
    an existing `out_dir` is only replaced when it holds nothing but a previous build.
    """
    out_dir = Path(out_dir)
    if side < 16:
        raise ValueError(f"tiny WD14 side must be at least 16 pixels, got {side}")
    _refuse_foreign_content(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    retired = staging.with_name(f"{staging.name}.old")
    try:
        export_wd14_onnx(tiny_wd14_module(seed=seed, side=side), staging / "model.onnx", side=side,
                         fixed_batch=fixed_batch)
        (staging / "selected_tags.csv").write_text(selected_tags_csv(), encoding="utf-8")
        staging.chmod(0o755)
        if out_dir.exists():
            os.replace(out_dir, retired)
        os.replace(staging, out_dir)
    finally:
        for leftover in (staging, retired):
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(leftover)
    return out_dir


def _refuse_foreign_content(out_dir: Path) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a folder; refusing to replace it with a tiny WD14 build")
    foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in {"model.onnx", "selected_tags.csv"})
    if foreign:
        raise FileExistsError(
            f"{out_dir} holds files that are not a tiny WD14 build ({', '.join(foreign[:5])}); refusing to replace it"
        )
