"""Shared fixtures for the tagging tests: the tiny WD14 tagger is built once per session (export takes a few
seconds), small images are drawn per test. torch is imported only by the fixtures that export the model, so
test files that do not need it start quickly."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from PIL import Image

if TYPE_CHECKING:
    from tagging.wd14 import WD14Tagger

TINY_SIDE = 64


@pytest.fixture(scope="session")
def tiny_tagger_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from embedded.tiny_wd14 import build_tiny_wd14

    return build_tiny_wd14(tmp_path_factory.mktemp("tiny") / "wd14", seed=0, side=TINY_SIDE)


@pytest.fixture(scope="session")
def fixed_batch_tagger_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from embedded.tiny_wd14 import build_tiny_wd14

    return build_tiny_wd14(tmp_path_factory.mktemp("tiny_fixed") / "wd14", seed=0, side=TINY_SIDE, fixed_batch=True)


@pytest.fixture(scope="session")
def tiny_tagger(tiny_tagger_dir: Path) -> WD14Tagger:
    from tagging.wd14 import WD14Tagger

    return WD14Tagger(tiny_tagger_dir, threads=1)


@pytest.fixture
def solid_image() -> Callable[..., Path]:
    """Write a one-colour image (any mode Pillow can save in the format the suffix picks) and return its path."""

    def make(path: Path, colour: object = (255, 0, 0), *, size: tuple[int, int] = (32, 32), mode: str = "RGB") -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new(mode, size, colour).save(path)
        return path

    return make


@pytest.fixture(scope="session")
def tiny_blip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from embedded.tiny_blip import build_tiny_blip

    return build_tiny_blip(tmp_path_factory.mktemp("tiny_blip") / "blip", seed=0)
