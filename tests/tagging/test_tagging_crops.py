"""Crop geometry of every mode, on synthetic images whose interesting region is known."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from tagging.crops import (
    CropRefused,
    auto_size,
    bucket_for,
    bucket_resolutions,
    centre_box,
    plan_regions,
    split_boxes,
)
from tagging.focal import entropy_points, face_points, focal_point
from tagging.prepare import PrepareOptions, prepare_images


def detail_on_the_right(width: int = 300, height: int = 100) -> Image.Image:
    """Flat grey with a noisy, cornery patch in the right sixth: the only interesting region."""
    pixels = np.full((height, width, 3), 128, dtype=np.uint8)
    rng = np.random.default_rng(0)
    pixels[20:80, width - 50:width - 10] = rng.integers(0, 256, (60, 40, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_centre_box_is_the_largest_centred_square() -> None:
    assert centre_box(60, 20, 1.0) == (20, 0, 40, 20)
    assert centre_box(20, 60, 1.0) == (0, 20, 20, 40)
    assert centre_box(100, 100, 2.0) == (0, 25, 100, 75)


def test_focal_crop_follows_the_detailed_region() -> None:
    image = detail_on_the_right()
    x, y = focal_point(image, face=0.0)
    assert x > 220 and 30 < y < 70
    (region,) = plan_regions(image, PrepareOptions(size=32, crop="focal"))
    assert region.box == (200, 0, 300, 100) and region.size == (32, 32)


def test_focal_weights_combine_the_detectors() -> None:
    image = Image.new("RGB", (400, 100), (128, 128, 128))
    detectors = {"face": lambda grey: [(20.0, 50.0)], "edges": lambda grey: [(380.0, 50.0)]}
    assert focal_point(image, face=1.0, entropy=0.0, edges=0.0, detectors=detectors) == (20.0, 50.0)
    x, _ = focal_point(image, face=0.75, entropy=0.0, edges=0.25, detectors=detectors)
    assert x == pytest.approx(0.75 * 20 + 0.25 * 380)
    assert focal_point(image, face=0, entropy=0, edges=0) == (200.0, 50.0)  # nothing asked: the centre


def test_bundled_face_cascade_loads_and_finds_nothing_in_a_flat_image() -> None:
    assert face_points(np.full((120, 120), 200, dtype=np.uint8)) == []


def drawn_face(side: int) -> Image.Image:
    """A blurred frontal face (oval, brows, dark eyes, nose, mouth) that OpenCV's Haar cascade detects."""
    image = Image.new("L", (side, side), 90)
    draw = ImageDraw.Draw(image)
    s = side
    draw.ellipse((s * .15, s * .05, s * .85, s * .98), fill=200)
    for left in (.27, .55):
        draw.rectangle((s * left, s * .30, s * (left + .18), s * .34), fill=60)
        draw.ellipse((s * (left + .02), s * .38, s * (left + .16), s * .46), fill=40)
    draw.polygon([(s * .5, s * .45), (s * .45, s * .65), (s * .55, s * .65)], fill=170)
    draw.ellipse((s * .36, s * .74, s * .64, s * .82), fill=80)
    return image.filter(ImageFilter.GaussianBlur(s / 60))


def test_focal_crop_centres_on_a_detected_face() -> None:
    image = Image.new("L", (600, 200), 90)
    image.paste(drawn_face(160), (400, 20))
    (face,) = face_points(np.asarray(image))
    assert 460 < face[0] < 500 and 80 < face[1] < 120
    x, _ = focal_point(image.convert("RGB"))  # the default weights, all three detectors
    assert x > 400
    (region,) = plan_regions(image.convert("RGB"), PrepareOptions(size=64, crop="focal"))
    left, _, right, _ = region.box
    assert left <= 420 and right >= 560  # the whole face is inside the crop


def test_entropy_window_finds_the_noisy_end() -> None:
    grey = np.asarray(detail_on_the_right().convert("L"))
    ((x, y),) = entropy_points(grey)
    assert x >= 200 and y == 50


def test_split_oversized_into_overlapping_tiles() -> None:
    options = PrepareOptions(split_threshold=0.5, overlap_ratio=0.2)
    assert split_boxes(300, 100, options) == [(0, 0, 100, 100), (66, 0, 166, 100), (133, 0, 233, 100),
                                              (200, 0, 300, 100)]
    assert split_boxes(100, 300, options)[-1] == (0, 200, 100, 300)
    assert split_boxes(140, 100, options) == [centre_box(140, 100, 1.0)]  # under the threshold: one square


def test_split_tiles_become_their_own_outputs(tmp_path: Path) -> None:
    src = tmp_path / "raw"
    src.mkdir()
    detail_on_the_right().save(src / "wide.png")
    manifest = prepare_images(src, tmp_path / "out", PrepareOptions(size=16, crop="split", flip=True))
    assert manifest["output"].tolist()[:3] == ["wide__tile0.png", "wide__tile0__flip.png", "wide__tile1.png"]
    assert manifest["tile"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert manifest[["crop_left", "crop_right"]].values.tolist()[-1] == [200, 300]


def test_auto_sized_crop_picks_the_largest_fitting_size() -> None:
    options = PrepareOptions()
    assert auto_size(1000, 500, options) == (768, 384)
    assert auto_size(100, 100, options) == (640, 640)
    # 1.087: the largest area within 10% is the square; the smallest error is 640 x 576 (1.111).
    assert auto_size(1000, 920, options) == (640, 640)
    assert auto_size(1000, 920, PrepareOptions(multicrop_objective="error")) == (640, 576)
    with pytest.raises(CropRefused):
        auto_size(1000, 100, options)


def test_buckets_without_upscale_follow_the_image() -> None:
    options = PrepareOptions(size=512, crop="buckets")
    assert bucket_for(300, 200, options) == ((256, 192), (16, 0, 283, 200))
    assert bucket_for(2000, 1000, options)[0] == (768, 384)  # kohya's rounding keeps the aspect exactly
    with pytest.raises(CropRefused):
        bucket_for(50, 50, options)


def test_predefined_buckets_pick_the_nearest_aspect() -> None:
    options = PrepareOptions(size=512, crop="buckets", bucket_no_upscale=False)
    resolutions = bucket_resolutions(options)
    assert (512, 512) in resolutions and all(w * h <= 512 * 512 and w % 64 == 0 for w, h in resolutions)
    assert bucket_for(2000, 1000, options)[0] == (704, 320)  # 2.2, the nearest to 2.0 within the area
    assert bucket_for(100, 100, options)[0] == (512, 512)  # upscaled to its bucket


def test_bucketed_outputs_keep_their_aspect(tmp_path: Path) -> None:
    src = tmp_path / "raw"
    src.mkdir()
    Image.new("RGB", (300, 200), (9, 9, 9)).save(src / "a.png")
    manifest = prepare_images(src, tmp_path / "out", PrepareOptions(size=512, crop="buckets"))
    assert manifest[["width", "height"]].values.tolist() == [[256, 192]]
    assert Image.open(tmp_path / "out" / "a.png").size == (256, 192)


def test_auto_crop_refusal_is_a_skip_with_a_reason(tmp_path: Path) -> None:
    src = tmp_path / "raw"
    src.mkdir()
    Image.new("RGB", (1000, 100)).save(src / "strip.png")
    manifest = prepare_images(src, tmp_path / "out", PrepareOptions(crop="auto"))
    assert manifest["status"].tolist() == ["skipped"]
    assert manifest["reason"].iloc[0].startswith("no auto-sized crop")
