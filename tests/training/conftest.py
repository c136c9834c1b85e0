"""Fixtures for the training-library tests: the embedded tiny SD model, built and loaded once per session,
and a small synthetic subject dataset like the demo's (a red disc on a dark background, at 64x64)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from embedded.tiny_clip import build_tiny_clip
from embedded.tiny_sd import build_tiny_sd
from training.base_model import BaseModel, load_base_model
from training.textual_inversion import TrainingExample

SUBJECT_CAPTION = "red, round, simple background"


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny CLIP built with tiny_sd_dir's seed, so its text tower is that model's text encoder."""
    return build_tiny_clip(tmp_path_factory.mktemp("tiny-clip") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_base(tiny_sd_dir: Path) -> BaseModel:
    """Shared by every test: tests that load embeddings into it must leave it as they found it."""
    return load_base_model(tiny_sd_dir, device="cpu", dtype=torch.float32)


def write_subject_image(path: Path, rng: np.random.Generator, side: int = 64) -> Path:
    """A red disc at a random place and size on a dark background: one consistent subject, varied framing."""
    image = np.full((side, side, 3), 40, dtype=np.uint8)
    cy, cx = rng.integers(side // 4, 3 * side // 4, size=2)
    radius = rng.integers(side // 8, side // 4)
    yy, xx = np.mgrid[:side, :side]
    image[(yy - cy) ** 2 + (xx - cx) ** 2 < radius**2] = (220, 40, 40)
    Image.fromarray(image).save(path)
    return path


@pytest.fixture(scope="session")
def subject_examples(tmp_path_factory: pytest.TempPathFactory) -> list[TrainingExample]:
    folder = tmp_path_factory.mktemp("subject")
    rng = np.random.default_rng(0)
    return [TrainingExample(write_subject_image(folder / f"{index:02d}.png", rng), SUBJECT_CAPTION) for index in range(32)]


def stop_after(step: int):
    """A progress callback that interrupts training after `step`, as Ctrl-C would."""

    def stop(current: int, loss: float) -> None:
        if current == step:
            raise KeyboardInterrupt

    return stop
