"""The held-out validation split: per source, by content, stable when images are added."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tagging.prepare import PrepareOptions, SelectOptions, prepare_images
from tagging.splits import TRAIN, VALIDATION, assign_splits, rows_of_split, split_position

SMALL = PrepareOptions(size=16)


def pictures(folder: Path, names: list[str], seed: int = 0, size: tuple[int, int] = (20, 28)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(names):
        pixels = np.random.default_rng([seed, index]).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)


def splits_by_source(manifest: pd.DataFrame) -> dict[str, set[str]]:
    kept = manifest[manifest["status"] != "skipped"]
    return {source: set(rows["split"]) for source, rows in kept.groupby("source")}


def test_adding_images_moves_no_other_source_and_renaming_moves_none(tmp_path: Path) -> None:
    src = tmp_path / "raw"
    pictures(src, [f"{index:02d}.png" for index in range(20)])
    select = SelectOptions(validation_fraction=0.3)
    before = splits_by_source(prepare_images(src, tmp_path / "out", SMALL, select=select))
    assert {TRAIN, VALIDATION} == set().union(*before.values())

    pictures(src, [f"new{index}.png" for index in range(10)], seed=7)
    (src / "03.png").rename(src / "renamed.png")
    after = splits_by_source(prepare_images(src, tmp_path / "out", SMALL, select=select))
    assert after["renamed.png"] == before.pop("03.png")
    assert {source: after[source] for source in before} == before
    held = [source for source, split in after.items() if split == {VALIDATION}]
    assert 0 < len(held) < len(after)


def test_every_output_of_a_source_and_its_near_duplicates_share_a_split(tmp_path: Path) -> None:
    src = tmp_path / "raw"
    pictures(src, [f"{index:02d}.png" for index in range(12)])
    smooth = np.random.default_rng(3).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    Image.fromarray(smooth).resize((64, 48), Image.Resampling.BICUBIC).save(src / "big.png")
    Image.fromarray(smooth).resize((32, 24), Image.Resampling.BICUBIC).save(src / "small.png")
    options = PrepareOptions(size=16, flip=True, greyscale=True)
    for fraction in (0.2, 0.5, 0.8):
        manifest = prepare_images(src, tmp_path / "out", options, select=SelectOptions(validation_fraction=fraction))
        by_source = splits_by_source(manifest)
        assert all(len(splits) == 1 for splits in by_source.values())
        assert manifest.groupby("source").size().eq(3).all()  # plain, flipped, greyscale
        assert manifest.set_index("source").loc["small.png", "duplicate_of"].tolist() == ["big.png"] * 3
        assert by_source["small.png"] == by_source["big.png"]


def test_at_least_one_source_is_held_out_and_never_all(tmp_path: Path) -> None:
    frame = pd.DataFrame({
        "source": ["a", "b", "c", "d"], "source_sha256": ["1" * 64, "2" * 64, "3" * 64, None],
        "status": ["processed", "reused", "processed", "skipped"], "duplicate_of": [None, None, None, None],
    })  # fmt: skip
    positions = {sha: split_position(sha) for sha in frame["source_sha256"][:3]}
    lowest, highest = min(positions, key=positions.get), max(positions, key=positions.get)
    tiny = assign_splits(frame, min(positions.values()) / 2)  # the threshold picks none: the lowest is held out
    assert tiny[frame["source_sha256"] == lowest].tolist() == [VALIDATION]
    assert (tiny == VALIDATION).sum() == 1 and tiny[3] == ""
    almost_all = assign_splits(frame, 0.999999)  # the threshold picks all: the highest trains
    assert almost_all[frame["source_sha256"] == highest].tolist() == [TRAIN]
    assert (almost_all == VALIDATION).sum() == 2
    assert assign_splits(frame, 0.0).tolist() == [TRAIN, TRAIN, TRAIN, ""]
    alone = frame.iloc[:1]
    assert assign_splits(alone, 0.9).tolist() == [TRAIN]  # one source: nothing to hold out
    with pytest.raises(ValueError, match="validation_fraction must be in"):
        assign_splits(frame, 1.0)


def test_the_split_follows_content_not_names(tmp_path: Path) -> None:
    shas = [f"{index:064x}" for index in range(400)]
    frame = pd.DataFrame({"source": [f"{i}.png" for i in range(400)], "source_sha256": shas,
                          "status": "processed", "duplicate_of": None})
    renamed = frame.assign(source=[f"other {i}.png" for i in range(400)]).iloc[::-1]
    split = assign_splits(frame, 0.25)
    assert assign_splits(renamed, 0.25).sort_index().tolist() == split.tolist()
    assert 0.15 < (split == VALIDATION).mean() < 0.35  # about the fraction asked for


def test_rows_of_split_reads_old_manifests_as_all_training() -> None:
    old = pd.DataFrame({"output": ["a.png", "b.png", None], "status": ["processed", "reused", "skipped"]})
    assert rows_of_split(old, TRAIN)["output"].tolist() == ["a.png", "b.png"]
    assert rows_of_split(old, VALIDATION).empty
    new = old.assign(split=[VALIDATION, TRAIN, ""])
    assert rows_of_split(new, TRAIN)["output"].tolist() == ["b.png"]
    assert rows_of_split(new, VALIDATION)["output"].tolist() == ["a.png"]
    with pytest.raises(ValueError, match="split must be"):
        rows_of_split(new, "test")
