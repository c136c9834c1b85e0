"""Class images for DreamBooth's prior preservation: sampled by the base model, cached by content key."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.class_images import ClassImageSpec, generate_class_images, read_class_images

SPEC = ClassImageSpec(prompt="a photo of a red disc", size=64, count=3, steps=2, sampler="ddim")


def test_class_images_are_sampled_at_the_size_and_cached(tiny_base, tmp_path: Path) -> None:
    folder = tmp_path / "class_images"
    first = generate_class_images(tiny_base, SPEC, folder)
    assert (first.rendered, first.reused) == (3, 0)
    assert read_class_images(folder) == first.paths
    pixels = [np.asarray(Image.open(path)) for path in first.paths]
    assert all(image.shape == (64, 64, 3) for image in pixels)
    assert not np.array_equal(pixels[0], pixels[1])  # seeded per image
    stamps = [path.stat().st_mtime_ns for path in first.paths]

    again = generate_class_images(tiny_base, SPEC, folder)
    assert (again.rendered, again.reused, again.removed) == (0, 3, [])
    assert [path.stat().st_mtime_ns for path in again.paths] == stamps

    more = generate_class_images(tiny_base, replace(SPEC, count=4), folder)
    assert (more.rendered, more.reused) == (1, 3)
    assert more.paths[:3] == first.paths


def test_a_new_prompt_replaces_the_set(tiny_base, tmp_path: Path) -> None:
    folder = tmp_path / "class_images"
    first = generate_class_images(tiny_base, SPEC, folder)
    other = generate_class_images(tiny_base, replace(SPEC, prompt="a photo of a dog"), folder)
    assert other.key != first.key
    assert (other.rendered, sorted(other.removed)) == (3, sorted(first.paths))
    assert sorted(folder.glob("*.png")) == sorted(other.paths)


def test_the_same_seed_gives_the_same_image(tiny_base, tmp_path: Path) -> None:
    a = generate_class_images(tiny_base, replace(SPEC, count=1), tmp_path / "a")
    b = generate_class_images(tiny_base, replace(SPEC, count=1), tmp_path / "b")
    assert a.paths[0].read_bytes() == b.paths[0].read_bytes()


def test_bad_specs_fail_clearly(tiny_base, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="class prompt is empty"):
        ClassImageSpec(prompt=" ", size=64)
    with pytest.raises(ValueError, match="multiple of the VAE"):
        generate_class_images(tiny_base, replace(SPEC, size=60), tmp_path)
    with pytest.raises(ValueError, match="generate the class images first"):
        read_class_images(tmp_path / "absent")
