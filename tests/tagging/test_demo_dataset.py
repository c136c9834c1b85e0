from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from embedded.demo_dataset import build_demo_dataset, demo_dataset_yaml
from tagging.images import list_images, load_rgb


def contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_same_seed_gives_the_same_bytes(tmp_path: Path) -> None:
    one = build_demo_dataset(tmp_path / "one", count=12, side=64, seed=5)
    two = build_demo_dataset(tmp_path / "two", count=12, side=64, seed=5)
    assert contents(one) == contents(two)
    other = build_demo_dataset(tmp_path / "other", count=12, side=64, seed=6)
    assert contents(other)["demo_000.png"] != contents(one)["demo_000.png"]


def test_image_i_does_not_depend_on_count(tmp_path: Path) -> None:
    few = build_demo_dataset(tmp_path / "few", count=3, side=48)
    many = build_demo_dataset(tmp_path / "many", count=6, side=48)
    assert (few / "demo_002.png").read_bytes() == (many / "demo_002.png").read_bytes()


def test_layout_file_kinds_and_settings(tmp_path: Path) -> None:
    dataset = build_demo_dataset(tmp_path / "demo", count=12, side=64)
    names = [p.name for p in list_images(dataset)]
    assert names == [f"demo_{i:03d}.{'jpg' if i in (3, 11) else 'png'}" for i in range(12)]
    with Image.open(dataset / "demo_001.png") as transparent:
        assert transparent.mode == "RGBA"
        assert np.asarray(transparent)[..., 3].min() == 0
    with Image.open(dataset / "demo_003.jpg") as jpeg:
        assert jpeg.format == "JPEG"
    assert all(load_rgb(dataset / name).size == (64, 64) for name in names)
    text = (dataset / "dataset.yaml").read_text(encoding="utf-8")
    assert text == demo_dataset_yaml()
    assert list(yaml.safe_load(text)) == ["preprocess", "tagging", "captions", "training", "evaluation", "aesthetic"]


def test_backgrounds_vary_while_the_character_stays(tmp_path: Path) -> None:
    dataset = build_demo_dataset(tmp_path / "demo", count=8, side=64)
    images = [np.asarray(load_rgb(path)).astype(int) for path in list_images(dataset)]
    corners = {tuple(image[0, 0] // 32) for image in images}
    assert len(corners) >= 4
    for image in images:  # the orange face is always visible
        orange = (image[..., 0] > 200) & (image[..., 1] > 90) & (image[..., 1] < 190) & (image[..., 2] < 90)
        assert orange.mean() > 0.03


def test_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    target = tmp_path / "mine"
    target.mkdir()
    (target / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        build_demo_dataset(target, count=2, side=32)
    assert [p.name for p in target.iterdir()] == ["holiday.jpg"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert len(list(build_demo_dataset(empty, count=2, side=32).iterdir())) == 3
