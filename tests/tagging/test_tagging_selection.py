"""What is kept and how it is described: duplicates, greyscale copies, caption sidecars, filename words."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tagging.filewords import filename_words, sidecar_caption
from tagging.prepare import PrepareOptions, SelectOptions, prepare_images
from tagging.prepare_cache import dhash, hamming
from tagging.sheets import crop_sheet

SMALL = PrepareOptions(size=16)


def picture(path: Path, seed: int = 0, size: tuple[int, int] = (64, 48)) -> Path:
    """A smooth random picture: resizing it keeps its perceptual hash, unlike pure noise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    small = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    Image.fromarray(small).resize(size, Image.Resampling.BICUBIC).save(path)
    return path


@pytest.mark.parametrize(
    ("name", "regex", "join", "expected"),
    [
        ("00012-a red cat.png", "", " ", "a red cat"),
        ("-5 x.jpg", "", " ", "x"),
        ("2023 photo 7.png", "", " ", "photo 7"),
        ("12-a red_cat (1).png", r"[a-z]+", ", ", "a, red, cat"),
        ("no numbers.webp", "", " ", "no numbers"),
    ],
)
def test_filename_words_follow_the_webui_rule(name: str, regex: str, join: str, expected: str) -> None:
    assert filename_words(name, word_regex=regex, join=join) == expected


def test_sidecar_captions_and_filename_words_reach_the_manifest(tmp_path: Path) -> None:
    src = tmp_path / "raw"
    picture(src / "01-blue sky.png", 1)
    picture(src / "sub" / "cat.png", 2)
    (src / "sub" / "cat.txt").write_text("a cat, sitting\n", encoding="utf-8")
    (src / "01-blue sky.txt").write_bytes(b"\xff\xfe not utf-8")
    rows = prepare_images(src, tmp_path / "out", SMALL).set_index("source")
    assert rows.loc["sub/cat.png", "source_caption"] == "a cat, sitting"
    assert pd.isna(rows.loc["01-blue sky.png", "source_caption"])  # unreadable as UTF-8: no caption
    assert rows.loc["01-blue sky.png", "filename_words"] == "blue sky"
    assert sidecar_caption(src / "missing.png") is None


def test_exact_duplicates_are_dropped_keeping_the_first(tmp_path: Path) -> None:
    src = tmp_path / "raw"
    picture(src / "a.png", 1)
    shutil.copy(src / "a.png", src / "b copy.png")
    manifest = prepare_images(src, tmp_path / "out", SMALL)
    rows = manifest.set_index("source")
    assert rows.loc["a.png", "status"] == "processed"
    assert rows.loc["b copy.png", "status"] == "skipped"
    assert rows.loc["b copy.png", "reason"] == "exact duplicate of a.png"
    assert rows.loc["b copy.png", "duplicate_of"] == "a.png"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png"]


def test_near_duplicates_are_reported_or_dropped_keeping_the_largest(tmp_path: Path) -> None:
    src = tmp_path / "raw"
    picture(src / "big.png", 3, size=(200, 150))
    picture(src / "small.jpg", 3, size=(80, 60))
    picture(src / "other.png", 4)
    reported = prepare_images(src, tmp_path / "out", SMALL).set_index("source")
    assert reported.loc["small.jpg", "duplicate_of"] == "big.png"
    assert reported.loc["small.jpg", "status"] == "processed"
    assert reported["duplicate_of"].drop("small.jpg").isna().all()
    dropped = prepare_images(src, tmp_path / "out", SMALL,
                             select=SelectOptions(drop_near_duplicates=True)).set_index("source")
    assert dropped.loc["small.jpg", "status"] == "skipped"
    assert dropped.loc["small.jpg", "reason"] == "near duplicate of big.png"
    assert dropped.loc["big.png", "status"] == "reused"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["big.png", "other.png"]
    off = prepare_images(src, tmp_path / "out", SMALL, select=SelectOptions(near_duplicate_distance=0))
    assert off["duplicate_of"].isna().all()


def test_dhash_is_stable_under_resizing_and_tells_pictures_apart(tmp_path: Path) -> None:
    one = Image.open(picture(tmp_path / "1.png", 5, size=(300, 200)))
    assert hamming(dhash(one), dhash(one.resize((90, 60)))) <= 4
    assert hamming(dhash(one), dhash(Image.open(picture(tmp_path / "2.png", 6)))) > 8


def test_greyscale_copies_are_their_own_rows(tmp_path: Path) -> None:
    src = tmp_path / "raw"
    picture(src / "a.png", 7)
    manifest = prepare_images(src, tmp_path / "out", PrepareOptions(size=16, flip=True, greyscale=True))
    assert manifest[["output", "flipped", "greyscale"]].values.tolist() == [
        ["a.png", False, False], ["a__flip.png", True, False], ["a__grey.png", False, True]]
    grey = np.asarray(Image.open(tmp_path / "out" / "a__grey.png")).astype(int)
    assert grey.shape == (16, 16, 3) and (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()


def test_crop_sheet_draws_the_boxes_on_the_source(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"no")
    thumb = tmp_path / "thumb.png"
    Image.new("RGB", (40, 20), (255, 255, 255)).save(thumb)  # a fifth of the source
    sheet = crop_sheet([(thumb, (200, 100), [(50, 0, 150, 100)]), (tmp_path / "bad.png", (1, 1), [])],
                       columns=2, cell=100)
    assert sheet.size == (200, 100)
    assert sheet.getpixel((25, 50)) == (255, 0, 0)  # the box's left edge, at half scale
    assert sheet.getpixel((50, 50)) == (255, 255, 255)  # inside the box, the source shows
    assert sheet.getpixel((150, 50)) == (128, 128, 128)  # the unreadable source
